"""stub"""
def broker_restart(f): raise NotImplementedError
bad_releases = batch_mix = broker_restart
