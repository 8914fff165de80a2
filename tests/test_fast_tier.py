"""The fast tier's rule (tests/conftest.py): a `fast` test needs neither real MNIST nor PostgreSQL, and is not `slow`."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.conftest import pytest_collection_modifyitems

pytestmark = pytest.mark.fast


@dataclass
class Item:
    nodeid: str
    fixturenames: list[str]
    markers: set[str] = field(default_factory=lambda: {"fast"})

    def get_closest_marker(self, name: str):
        return name if name in self.markers else None


def check_accepts(rule) -> None:
    """A fast test on synthetic data, and unmarked tests that need MNIST or PostgreSQL: all kept, in order, as they
    were (the rule refuses loudly or not at all: it never drops a test from the run)."""
    items = [Item("t::a", ["tmp_path", "tiny_onnx_model"]), Item("t::b", ["mnist_mirror"], markers=set()),
             Item("t::c", ["postgres_server"], markers={"slow"})]
    before = [(i.nodeid, list(i.fixturenames), set(i.markers)) for i in items]
    assert rule(None, items) is None
    assert [(i.nodeid, list(i.fixturenames), set(i.markers)) for i in items] == before


def drops_heavy_tests(config, items):  # a mutant: deselects what needs real data instead of saying so
    items[:] = [i for i in items if not {"mnist_mirror", "postgres_server"} & set(i.fixturenames)]


def test_a_fast_test_on_synthetic_data_is_accepted():
    check_accepts(pytest_collection_modifyitems)
    with pytest.raises(AssertionError):
        check_accepts(drops_heavy_tests)


@pytest.mark.parametrize(("item", "why"), [
    (Item("t::x", ["tmp_path", "small_prepared_dir", "mnist_mirror"]), "uses mnist_mirror \\(real MNIST\\)"),
    (Item("t::x", ["real_mirror"]), "uses real_mirror \\(real MNIST\\)"),
    (Item("t::x", ["postgres_db", "postgres_server"]), "uses postgres_server \\(a PostgreSQL server\\)"),
    (Item("t::x", [], markers={"fast", "slow"}), "is also marked slow"),
])
def test_a_fast_test_that_needs_real_data_a_server_or_is_slow_is_refused(item, why):
    with pytest.raises(pytest.UsageError, match=f"^t::x is marked fast but {why}: drop one of the two$"):
        pytest_collection_modifyitems(None, [item])
