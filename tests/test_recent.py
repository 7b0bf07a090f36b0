"""common.recent.Recent: a bounded memory that forgets the oldest key first."""

import pytest

from bertpool.common.recent import Recent


def test_put_says_whether_the_key_is_new_and_keeps_the_newest_value() -> None:
    recent: Recent[str, int] = Recent(4)
    assert recent.put("a", 1) is True
    assert recent.put("a", 2) is False
    assert recent.get("a") == 2 and "a" in recent and len(recent) == 1
    assert recent.get("b") is None and recent.get("b", 7) == 7 and "b" not in recent


@pytest.mark.parametrize("limit", [1, 3])
def test_the_oldest_put_is_forgotten_first(limit: int) -> None:
    recent: Recent[int, None] = Recent(limit)
    for key in range(limit + 2):
        recent.put(key)
    assert len(recent) == limit
    assert [k for k in range(limit + 2) if k in recent] == list(range(2, limit + 2))


def test_a_key_put_again_keeps_its_place() -> None:
    recent: Recent[str, int] = Recent(2)
    recent.put("a", 1)
    recent.put("b", 2)
    recent.put("a", 3)  # still the oldest
    recent.put("c", 4)
    assert "a" not in recent and recent.get("b") == 2 and recent.get("c") == 4


def test_touch_makes_a_key_the_newest() -> None:
    recent: Recent[str, int] = Recent(2)
    recent.put("a", 1)
    recent.put("b", 2)
    recent.touch("a", 3)  # now b is the oldest
    recent.put("c", 4)
    assert "b" not in recent and recent.get("a") == 3 and recent.get("c") == 4
    recent.touch("d", 5)  # a new key: the oldest (a) goes
    assert "a" not in recent and len(recent) == 2
