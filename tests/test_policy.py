"""Treatment policy: the §4 defaults exactly, exact mm -> µm, and errors that name the key."""

from __future__ import annotations

import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from controller.policy import (
    PolicyError,
    TreatmentPolicy,
    load_policy,
    policy_from_mapping,
)

# product.md §4, verbatim: zone -> (max depth mm, max passes)
SECTION_4_TABLE = {
    "forehead": ("1.0", 3),
    "periorbital": ("0.5", 2),
    "nose": ("0.75", 2),
    "cheeks": ("1.5", 4),
    "perioral": ("0.75", 2),
    "chin": ("1.5", 3),
    "jawline": ("1.0", 3),
    "neck": ("1.0", 3),
    "decolletage": ("1.0", 2),
    "acne_scars": ("2.0", 4),
    "stretch_marks": ("2.0", 4),
}


def test_default_policy_matches_the_section_4_table_exactly() -> None:
    policy = load_policy()
    assert set(policy.zones) == set(SECTION_4_TABLE)
    for zone_id, (depth_mm, passes) in SECTION_4_TABLE.items():
        zone = policy.zones[zone_id]
        assert zone.max_depth_um == int(Decimal(depth_mm) * 1000), zone_id
        assert zone.max_passes == passes, zone_id
        assert zone.puncture_budget is None
    assert policy.device_ceiling_um == 2500
    assert policy.depth_tolerance_um == 50
    assert policy.zones["acne_scars"].label == "acne scars"
    assert policy.zones["stretch_marks"].label == "stretch marks"


def test_default_plans_only_name_defined_zones_and_the_fingerprint_is_stable() -> None:
    policy = load_policy()
    assert policy.plans
    for plan in policy.plans.values():
        assert plan.zone_ids
        assert set(plan.zone_ids) <= set(policy.zones)
    assert load_policy().fingerprint == policy.fingerprint
    assert len(policy.fingerprint) == 64


def _base() -> dict[str, Any]:
    return {
        "policy_version": 1,
        "zones": {"cheeks": {"max_depth_mm": Decimal("1.5"), "max_passes": 4}},
        "plans": {"face": {"zones": ["cheeks"]}},
    }


def test_minimal_policy_takes_documented_defaults() -> None:
    policy = policy_from_mapping(_base())
    assert policy.device_ceiling_um == 2500
    assert policy.depth_tolerance_um == 50
    assert policy.lift_off_grace_ms == 300
    assert policy.zones["cheeks"].label == "cheeks"
    assert policy.plans["face"].zone_ids == ("cheeks",)


@pytest.mark.parametrize(
    ("depth", "um"),
    [
        (Decimal("0.75"), 750),
        (Decimal("1.205"), 1205),
        (Decimal("2.5"), 2500),
        (1, 1000),
        (0.001, 1),  # a plain float is converted through its shortest repr, exactly
        (0.3, 300),
    ],
)
def test_millimetres_convert_exactly_to_micrometres(depth: object, um: int) -> None:
    data = _base()
    data["zones"]["cheeks"]["max_depth_mm"] = depth
    assert policy_from_mapping(data).zones["cheeks"].max_depth_um == um


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        policy_from_mapping(data, source="test.toml")
    assert "test.toml" in str(caught.value)
    return caught.value.problems


def _set(data: dict[str, Any], dotted: str, value: object) -> dict[str, Any]:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "zones.cheeks.max_depth_mm",
            Decimal("3.0"),
            "zones.cheeks.max_depth_mm: 3.0 exceeds the device ceiling 2.5 mm",
        ),
        (
            "zones.cheeks.max_depth_mm",
            Decimal("0.7505"),
            "zones.cheeks.max_depth_mm: 0.7505 mm is not a whole number of micrometres",
        ),
        ("zones.cheeks.max_depth_mm", Decimal("0"), "zones.cheeks.max_depth_mm: must be more"),
        ("zones.cheeks.max_depth_mm", "1.0", "zones.cheeks.max_depth_mm: must be a number"),
        ("zones.cheeks.max_depth_mm", True, "zones.cheeks.max_depth_mm: must be a number"),
        ("zones.cheeks.max_passes", 0, "zones.cheeks.max_passes: must be at least 1"),
        ("zones.cheeks.max_passes", 2.0, "zones.cheeks.max_passes: must be a whole number"),
        ("zones.cheeks.max_passes", 9, "zones.cheeks.max_passes: 9 exceeds max_passes_ceiling"),
        ("zones.cheeks.puncture_budget", 0, "zones.cheeks.puncture_budget: must be at least 1"),
        ("zones.cheeks.colour", "red", "zones.cheeks.colour: unknown key"),
        ("device_ceiling_mm", Decimal("2.6"), "device_ceiling_mm: 2.6 must be more than 0"),
        ("depth_tolerance_mm", Decimal("0.6"), "depth_tolerance_mm: 0.6 must be between"),
        ("lift_off_grace_ms", 5000, "lift_off_grace_ms: must be at most 2000"),
        ("max_lease_ms", 10, "max_lease_ms: must be at least 50"),
        ("min_speed_hz", 20, "min_speed_hz: must be at least 50"),
        ("max_speed_hz", 200, "max_speed_hz: must be at most 150"),
        ("telemetry_rate_hz", 5, "telemetry_rate_hz: must be at least 20"),
        ("policy_version", 2, "policy_version: must be 1"),
        ("zones.Bad Zone", {"max_depth_mm": 1, "max_passes": 1}, "zones.Bad Zone: 'Bad Zone' is"),
        ("plans.face.zones", ["cheeks", "chekes"], "plans.face.zones: 'chekes' is not a zone"),
        ("plans.face.zones", ["cheeks", "cheeks"], "plans.face.zones: 'cheeks' is listed twice"),
        ("plans.face.zones", [], "plans.face.zones: List should have at least 1 item"),
        ("plans.face.colour", "red", "plans.face.colour: unknown key"),
        ("colour", "red", "colour: unknown key"),
    ],
)
def test_every_bad_key_is_named(key: str, value: object, expected: str) -> None:
    problems = _problems(_set(_base(), key, value))
    assert any(p.startswith(expected) for p in problems), problems


def test_a_lowered_device_ceiling_applies_to_every_zone() -> None:
    data = _set(_base(), "device_ceiling_mm", Decimal("1.2"))
    assert _problems(data) == ["zones.cheeks.max_depth_mm: 1.5 exceeds the device ceiling 1.2 mm"]


def test_speed_range_must_be_ordered() -> None:
    data = _set(_set(_base(), "min_speed_hz", 120), "max_speed_hz", 80)
    assert _problems(data) == ["max_speed_hz: 80 is below min_speed_hz (120)"]


@pytest.mark.parametrize("missing", ["policy_version", "zones", "plans"])
def test_required_keys(missing: str) -> None:
    data = _base()
    del data[missing]
    assert _problems(data) == [f"{missing}: required key is missing"]


def test_zone_without_depth_names_the_missing_key() -> None:
    data = _base()
    del data["zones"]["cheeks"]["max_depth_mm"]
    assert _problems(data) == ["zones.cheeks.max_depth_mm: required key is missing"]


def test_every_problem_is_reported_at_once() -> None:
    data = _base()
    data["zones"]["cheeks"]["max_depth_mm"] = Decimal("3.0")
    data["zones"]["nose"] = {"max_depth_mm": Decimal("0.75"), "max_pases": 2}
    data["plans"]["face"]["zones"] = ["cheeks", "eyes"]
    data["typo"] = 1
    problems = _problems(data)
    keys = sorted(p.split(":")[0] for p in problems)
    assert keys == [
        "plans.face.zones",
        "typo",
        "zones.cheeks.max_depth_mm",
        "zones.nose.max_pases",
        "zones.nose.max_passes",
    ]


def test_load_policy_reads_toml_with_exact_decimals(tmp_path: Path) -> None:
    path = tmp_path / "clinic.toml"
    path.write_text(
        "policy_version = 1\n"
        "depth_tolerance_mm = 0.025\n"
        "[zones.lips]\nlabel = 'lips'\nmax_depth_mm = 0.3\nmax_passes = 2\n"
        "puncture_budget = 4000\n"
        "[plans.lips]\nzones = ['lips']\n"
    )
    policy = load_policy(path)
    assert isinstance(policy, TreatmentPolicy)
    assert policy.zones["lips"].max_depth_um == 300
    assert policy.zones["lips"].puncture_budget == 4000
    assert policy.depth_tolerance_um == 25
    assert policy.source == str(path)


def test_load_policy_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "clinic.toml"
    path.write_text(
        "policy_version = 1\n[zones.cheeks]\nmax_depth_mm = 3.0\nmax_passes = 4\n"
        "[plans.p]\nzones = ['cheeks']\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    text = str(caught.value)
    assert str(path) in text
    assert "zones.cheeks.max_depth_mm: 3.0 exceeds the device ceiling 2.5 mm" in text
    assert "will not start" in text


def test_unreadable_and_malformed_files_are_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("policy_version = = 1\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(broken)


def test_packaged_default_file_is_the_one_loaded() -> None:
    text = (Path(__file__).parents[1] / "controller" / "default_policy.toml").read_text()
    data = tomllib.loads(text, parse_float=Decimal)
    assert policy_from_mapping(data).fingerprint == load_policy().fingerprint
