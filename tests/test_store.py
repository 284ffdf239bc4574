"""The store layer's readers that need no store: a study's objective as its parent run recorded it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from research.store import DEFAULT_OBJECTIVE, Objective, objective_params, study_objective


def parent(**params: str) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(params=params))


def test_a_study_objective_is_read_back_from_the_values_the_sweep_records():
    recorded = parent(**objective_params("minimize", "val_loss"))
    assert study_objective(recorded) == Objective("minimize", "val_loss")
    assert not study_objective(recorded).maximize


@pytest.mark.parametrize("text, expected", [
    ("maximize val_f1_macro", Objective("maximize", "val_f1_macro")),
    ("minimize val_loss", Objective("minimize", "val_loss")),
])
def test_a_parent_logged_before_the_values_is_read_from_its_one_string_param(text, expected):
    assert study_objective(parent(objective=text)) == expected
    assert str(expected) == text  # the text `runs` shows is the one the old param held


def test_a_parent_with_no_objective_reads_none_and_callers_share_one_default():
    assert study_objective(parent()) is None
    assert study_objective(parent(objective="maximize")) is None  # no metric named
    assert DEFAULT_OBJECTIVE == Objective("maximize", "val_f1_macro")
    assert DEFAULT_OBJECTIVE.maximize


def test_the_default_objective_is_the_sweep_specs_default():
    from research.sweep.spec import ObjectiveSpec

    spec = ObjectiveSpec()
    assert Objective(spec.direction, spec.metric) == DEFAULT_OBJECTIVE
