"""Scenario schema: seed defaults, field-path errors, --set parsing, base chains, malformed input."""

from __future__ import annotations

import math
import tomllib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from twin.errors import ScenarioError
from twin.scenario import BUNDLED, Scenario, apply_overrides, load_scenario, parse_override, to_toml, validate


def test_defaults_are_the_seeds_values():
    sc = load_scenario("paper")
    b, r, d, p = sc.beamline, sc.reconstruction, sc.dic, sc.protocol
    assert b.energy_kev == 29.6
    assert len(b.propagation_distances_m) == 4
    assert (b.n_projections, b.angular_range_deg, b.n_flats, b.n_darks, b.exposure_s) == (2505, 360.0, 20, 21, 0.02)
    assert b.detector_pixels == 2048 and sc.sample.voxel_size_um == 0.05
    assert r.delta_beta == 170.0
    assert d.node_spacing_px == [100, 70, 35]
    assert (d.max_iterations, d.registration_max_iterations, d.delta_phi_tolerance) == (3000, 3000, 1e-4)
    assert d.retry_margins_px == [10, 20, 30, 40] and d.retry_max_iterations == [1000, 2000, 3000]
    assert math.isclose(p.charge_c_rate, 1 / 3) and p.upper_cutoff_v == 4.3
    assert p.cv_current_threshold_c_rate == 0.1
    assert math.isclose(p.discharge_c_rate, 1 / 6) and p.lower_cutoff_v == 2.5
    assert (p.scan_interval_min, p.pre_scan_ocv_min, p.scan_duration_min, p.final_scans) == (30.0, 1.0, 13.0, 2)
    seg = sc.segmentation
    assert (seg.tile_shape_px, seg.batch_size, seg.epochs, seg.learning_rate, seg.dropout, seg.validation_split) == (
        [256, 512], 1, 150, 1e-4, 0.2, 0.3)
    assert seg.n_training_slices == 12 and seg.augmentations_per_slice == 3
    s = sc.sample
    assert (s.si_mass_fraction, s.binder_mass_fraction, s.carbon_black_mass_fraction, s.swcnt_mass_fraction) == (
        0.89, 0.09, 0.018, 0.002)
    assert sc.cell.electrode_diameter_mm == 1.1


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_scenarios_load_and_keep_the_physics(name):
    sc = load_scenario(name)
    paper = load_scenario("paper")
    assert sc.name == name
    # scaled scenarios change sizes, never the physics or the protocol
    assert sc.protocol == paper.protocol
    assert sc.beamline.energy_kev == paper.beamline.energy_kev
    assert sc.beamline.propagation_distances_m == paper.beamline.propagation_distances_m
    assert sc.reconstruction.delta_beta == paper.reconstruction.delta_beta
    assert sc.sample.electrode_thickness_um == paper.sample.electrode_thickness_um


def test_core_shell_and_pathway_differ_only_in_mechanism():
    a = load_scenario("core_shell").model_dump()
    b = load_scenario("pathway").model_dump()
    diff = {k for k in a if a[k] != b[k]}
    assert diff == {"name", "description", "sample"}
    assert {k for k in a["sample"] if a["sample"][k] != b["sample"][k]} == {"mechanism"}


def test_volume_shape_follows_sizes():
    sc = load_scenario("tiny")
    s = sc.sample
    assert sc.volume_shape == (
        round((s.current_collector_thickness_um + s.electrode_thickness_um + s.headroom_um) / s.voxel_size_um),
        round(s.lateral_size_um / s.voxel_size_um), round(s.lateral_size_um / s.voxel_size_um))


def test_fresnel_number_matches_hand_calculation():
    # a = 50 nm, lambda = hc/E = 4.1887e-11 m at 29.6 keV, z = 5 mm -> F = 2.5e-15 / 2.094e-13
    sc = load_scenario("paper")
    assert sc.fresnel_numbers()[0] == pytest.approx(2.5e-15 / (4.18866e-11 * 0.005), rel=1e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("beamline.propagation_distances_m[2]=-0.01", "beamline.propagation_distances_m[2]: must be > 0, got -0.01"),
        ("beamline.energy_kev=0", "beamline.energy_kev: must be > 0, got 0"),
        ("beamline.n_projections=12.5", "beamline.n_projections: input should be a valid integer, got 12.5"),
        ("beamline.n_projections=true", "beamline.n_projections: input should be a valid integer, got True"),
        ("run.seed=-1", "run.seed: must be >= 0, got -1"),
        ("sample.voxel_size_um=nan", "sample.voxel_size_um: must be a finite number, got nan"),
        ("sample.voxel_size_um=inf", "sample.voxel_size_um: must be a finite number, got inf"),
        ("sample.mechanism=shell", "sample.mechanism: must be one of 'core_shell' or 'pathway', got 'shell'"),
        ("dic.node_spacing_px=[]", "dic.node_spacing_px: must have at least 1 items, got []"),
        ("dic.node_spacing_px=[8,12]", "dic.node_spacing_px: must decrease from coarse to fine, got [8, 12]"),
        ("protocol.lower_cutoff_v=4.5", "protocol.lower_cutoff_v: must be below protocol.upper_cutoff_v (4.3), got 4.5"),
        ("protocol.cv_current_threshold_c_rate=0.5", "protocol.cv_current_threshold_c_rate: must be below"),
        ("beamline.propagation_distances_m=[0.005,0.005]", "beamline.propagation_distances_m: distances must differ"),
        ("sample.binder_mass_fraction=0.5", "sample.*_mass_fraction: must add up to 1, got 1.41"),
        ("beamline.detector_pixels=10", "beamline.detector_pixels: 10 px of 0.4 µm cannot see"),
        ("dic.node_spacing_px=[60,8]", "dic.node_spacing_px[0]: two nodes must fit"),
        ("beamline.enrgy_kev=3", "beamline.enrgy_kev: unknown field (did you mean 'energy_kev'?)"),
        ("bemline.energy_kev=3", "bemline: unknown field (did you mean 'beamline'?)"),
        ("beamline.propagation_distances_m[7]=0.1", "beamline.propagation_distances_m[7]: no such list element"),
    ],
)
def test_bad_values_name_the_field_path(override, message):
    with pytest.raises(ScenarioError) as info:
        load_scenario("tiny", [override])
    assert message in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ScenarioError) as info:
        load_scenario("tiny", ["beamline.energy_kev=-1", "run.workers=0"])
    assert len(info.value.problems) == 2


def test_unknown_key_in_a_file_is_refused_with_a_suggestion(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[dic]\nnode_spacing = [10, 5]\n')
    with pytest.raises(ScenarioError, match=r"dic.node_spacing: unknown field \(did you mean 'node_spacing_px'\?\)"):
        load_scenario(f)


def test_text_for_a_number_is_not_coerced(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[beamline]\nenergy_kev = "29.6"\n')
    with pytest.raises(ScenarioError, match="beamline.energy_kev"):
        load_scenario(f)


def test_base_chain_merges_tables(tmp_path):
    (tmp_path / "a.toml").write_text('base = "tiny"\n[dic]\nnode_spacing_px = [10, 6]\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\nname = "b"\n[reconstruction]\ndelta_beta = 477.0\n')
    sc = load_scenario(tmp_path / "b.toml")
    tiny = load_scenario("tiny")
    assert sc.dic.node_spacing_px == [10, 6]
    assert sc.reconstruction.delta_beta == 477.0
    assert sc.sample == tiny.sample  # untouched tables come from the base


def test_circular_base_is_refused(tmp_path):
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ScenarioError, match="circular"):
        load_scenario(tmp_path / "a.toml")


def test_invalid_toml_names_the_file(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("[sample\nvoxel_size_um = 1\n")
    with pytest.raises(ScenarioError, match="broken.toml: not valid TOML"):
        load_scenario(f)


def test_resolved_toml_round_trips():
    sc = load_scenario("quickstart", ["reconstruction.delta_beta=250", "dic.node_spacing_px=[20,10]"])
    again = validate(tomllib.loads(to_toml(sc)))
    assert again == sc


# --set parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("run.seed=42", ["run", "seed"], 42),
        ("reconstruction.delta_beta=1.7e2", ["reconstruction", "delta_beta"], 170.0),
        ("reconstruction.equalize_histogram=false", ["reconstruction", "equalize_histogram"], False),
        ("dic.node_spacing_px=[20,10]", ["dic", "node_spacing_px"], [20, 10]),
        ("dic.node_spacing_px = [ 20, 10 ]", ["dic", "node_spacing_px"], [20, 10]),
        ("sample.mechanism=core_shell", ["sample", "mechanism"], "core_shell"),
        ('sample.mechanism="core_shell"', ["sample", "mechanism"], "core_shell"),
        ("beamline.propagation_distances_m[1]=0.006", ["beamline", "propagation_distances_m", 1], 0.006),
        ("run.scheduler=tcp://127.0.0.1:8786", ["run", "scheduler"], "tcp://127.0.0.1:8786"),
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("text", ["run.seed", "=3", "run..seed=1", "a.b[x]=1", "a.b[1=2"])
def test_malformed_override_is_a_scenario_error(text):
    with pytest.raises(ScenarioError):
        apply_overrides({}, [text])


def test_override_sets_nested_and_indexed_fields():
    sc = load_scenario("tiny", ["beamline.propagation_distances_m[3]=0.009", "segmentation.tile_shape_px=[32,32]"])
    assert sc.beamline.propagation_distances_m[3] == 0.009
    assert sc.beamline.propagation_distances_m[:3] == load_scenario("tiny").beamline.propagation_distances_m[:3]
    assert sc.segmentation.tile_shape_px == [32, 32]


# Malformed scenarios never escape as anything but a ScenarioError ------------------------

_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True)), max_size=5),
)
_sections = list(Scenario.model_fields)


def _field_names(section: str) -> list[str]:
    ann = Scenario.model_fields[section].annotation
    return list(getattr(ann, "model_fields", {})) or ["x"]


@st.composite
def malformed_scenarios(draw):
    data = {}
    for section in draw(st.lists(st.sampled_from(_sections + ["nonsense", "beamlin"]), max_size=4, unique=True)):
        if section in ("name", "description"):
            data[section] = draw(_leaf)
            continue
        if draw(st.booleans()) and section in Scenario.model_fields:
            names = _field_names(section) if section not in ("nonsense", "beamlin") else ["x"]
            keys = draw(st.lists(st.one_of(st.sampled_from(names), st.text(min_size=1, max_size=8)), max_size=4))
            data[section] = {k: draw(_leaf) for k in keys}
        else:
            data[section] = draw(_leaf)
    return data


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed_scenarios())
def test_malformed_scenarios_raise_only_scenario_errors(data):
    try:
        validate(data)
    except ScenarioError as exc:
        assert exc.problems and all(isinstance(p, str) and ":" in p for p in exc.problems)


_override_text = st.one_of(
    st.text(max_size=40),
    st.builds(lambda s, f, v: f"{s}.{f}={v}", st.sampled_from(_sections + ["zzz"]),
              st.text(min_size=0, max_size=15), st.text(max_size=15)),
    st.builds(lambda s, v: f"{s}={v}", st.sampled_from([
        "beamline.propagation_distances_m[0]", "dic.node_spacing_px", "run.seed", "sample.voxel_size_um",
        "beamline.propagation_distances_m[9]", "segmentation.tile_shape_px[1]"]),
        st.one_of(st.text(max_size=10), st.integers().map(str), st.floats().map(repr),
                  st.lists(st.integers(-3, 200), max_size=4).map(str))),
)


@pytest.mark.parametrize("override, field", [
    ("sample.voxel_size_um=1.400482128633423e-307", "sample.lateral_size_um"),  # found by the test below (was an OverflowError)
    ("sample.lateral_size_um=1e308", "sample.lateral_size_um"),
    ("sample.headroom_um=1e300", "sample height"),
])
def test_absurd_voxel_counts_are_a_scenario_error_naming_the_field(override, field):
    with pytest.raises(ScenarioError, match=field):
        load_scenario("tiny", [override])


@settings(max_examples=500, deadline=None)
@given(st.lists(_override_text, min_size=1, max_size=3))
@example(["name.[²="])  # found by hypothesis in CI: "²".isdigit() is True, int("²") raises ValueError
def test_any_set_string_gives_a_scenario_or_a_scenario_error(overrides):
    try:
        load_scenario("tiny", overrides)
    except ScenarioError as exc:
        assert exc.problems


def test_scenario_reference_doc_is_up_to_date():
    import runpy
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    generated = runpy.run_path(str(docs / "make_scenario_reference.py"))["reference_markdown"]()
    assert (docs / "scenario.md").read_text() == generated, (
        "docs/scenario.md is stale: python docs/make_scenario_reference.py > docs/scenario.md")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["sample.voxel_size_um", "sample.lateral_size_um", "sample.electrode_thickness_um",
                        "sample.headroom_um", "sample.current_collector_thickness_um",
                        "sample.particle_median_diameter_um", "beamline.detector_pixels"]),
       st.floats(min_value=1e-308, max_value=1e308))
def test_extreme_sizes_give_a_scenario_or_a_scenario_error(field, value):
    """Sizes from 1e-308 to 1e308: a valid scenario or a validation error, never an overflow from dividing them."""
    value = int(min(value, 2**62)) if field == "beamline.detector_pixels" else value
    try:
        load_scenario("tiny", [f"{field}={value!r}"])
    except ScenarioError as exc:
        assert exc.problems
