"""The update rig's ``fleet`` fixture, for every agent test that moves a fleet."""

from tests.support.update_fleet import fleet  # noqa: F401  (a fixture, found by name)
