import os
from collections.abc import Iterator

import pytest
from first_call_waits import FirstCallWaits
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fast", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


@pytest.fixture
def first_call_waits() -> Iterator[FirstCallWaits]:
    waits = FirstCallWaits()
    yield waits
    # Never leave a tool thread waiting past its test.
    waits.release.set()
