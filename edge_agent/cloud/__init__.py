"""The cloud side of the cascade: the link and its circuit breaker, the escalation rate limit, and the
spool of cases the cloud did not get in time, replayed when it is back."""
