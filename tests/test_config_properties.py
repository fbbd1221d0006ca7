"""Property-based check of config parsing: any mapping validates or raises ConfigError."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from fedlease.fl import ConfigError, FLConfig, from_dict

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2000),
    st.floats(-1, 10) | st.just(math.nan) | st.just(math.inf),
    st.text(max_size=8),
    st.lists(st.sampled_from(["sst2", "qnli", "mrpc", "rte", "imdb"]), max_size=6),
    st.dictionaries(st.sampled_from(["seed", "client_failure_rate", "oops"]), st.integers(-1, 3)),
)
KEYS = st.sampled_from([*FLConfig.__dataclass_fields__, "bogus"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_config_parsing_accepts_or_names_the_problem(raw):
    raw = {"clients": ["sst2", "qnli", "sst2"], **raw}
    try:
        cfg = from_dict(raw)
    except ConfigError as exc:
        message = str(exc)
        assert "config key" in message or "unknown task" in message, message
        return
    assert len(cfg.clients) >= 2 and cfg.rank >= 1 and 0 <= cfg.dropout < 1
    assert cfg.lr > 0 and math.isfinite(cfg.lr) and cfg.alpha > 0
