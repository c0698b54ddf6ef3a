"""Operator tools on top of the core and the services: the ``edgecloud`` command (demo, bench, model
toolchain, engines, hard examples, certificates, signing keys and fleet releases) and the launchers the
demo and the tests share. Devices need none of it."""
