# The provider simulator fixtures, shared with tests/runs: the one-authentication-path tests stream a real run.
from tests.runs.conftest import simulator, simulator_server  # noqa: F401
