"""Which names a %%dash cell sends and brings back."""

import pytest

from dash_kernel.cellcode import analyze_cell


def test_reads_before_writes_and_comprehension_scopes():
    names = analyze_cell("y = x + 1\nz = [y * k for k in range(n)]")
    assert names.reads == ("x", "n")
    assert names.writes == ("y", "z")


def test_function_bodies_read_late_and_builtins_are_not_sent():
    names = analyze_cell(
        "import numpy as np\ndef f(q):\n    return q * w + np.pi\nw = 3\nr = f(v)\nprint(r)"
    )
    assert names.reads == ("v",)
    assert names.writes == ("np", "f", "w", "r")


def test_augmented_assignment_reads_and_writes():
    names = analyze_cell("total += step\nfor i in range(3):\n    acc = i")
    assert names.reads == ("step", "total")
    assert set(names.writes) == {"total", "i", "acc"}


def test_with_except_walrus_and_class_bodies():
    source = "with open(p) as fh:\n    data = fh.read()\nclass A(Base):\n    c = cfg\n(k := size)"
    names = analyze_cell(source)
    assert names.reads == ("p", "Base", "cfg", "size")
    assert set(names.writes) == {"fh", "data", "A", "k"}


def test_a_cell_that_does_not_parse_raises_before_anything_is_sent():
    with pytest.raises(SyntaxError):
        analyze_cell("x = (1 +")
