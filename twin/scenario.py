"""The scenario: one validated description of a whole twin.

A scenario is a TOML file (or a bundled name: ``tiny``, ``quickstart``,
``core_shell``, ``pathway``, ``paper``) with the sections ``sample``, ``cell``,
``protocol``, ``beamline``, ``reconstruction``, ``segmentation``, ``dic``,
``validation`` and ``run``. Every field has the seed's value as its default
where the seed gives one (Häusler et al., Supplementary Notes 1-5), so the
``paper`` scenario is nearly empty and scaled-down scenarios only change sizes.

Validation runs in two passes, as nabu does: each field alone (pydantic), then
across fields (:func:`check_coupled`). Every problem is reported as
``field.path: what is wrong, got value``.

A scenario file may start from another one with ``base = "quickstart"`` (a
bundled name or a path relative to the file); its tables are merged key by key.
"""

from __future__ import annotations

import copy
import difflib
import math
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from twin.errors import ScenarioError

BUNDLED = ("tiny", "quickstart", "core_shell", "pathway", "paper")

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    """Strict base: unknown keys, NaN and infinities are refused; no silent coercion of text."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, validate_default=True)


class Sample(_Section):
    """The synthetic electrode (seed Note 1; Figs S11, S16)."""

    voxel_size_um: PositiveFloat = Field(0.05, description="Voxel edge of the phantom and of the reconstruction, µm (seed: 50 nm).")
    lateral_size_um: PositiveFloat = Field(102.4, description="Field of view along y and x, µm (2048 px × 50 nm).")
    electrode_thickness_um: PositiveFloat = Field(20.0, description="Calendered Si composite thickness, µm.")
    current_collector_thickness_um: Annotated[float, Field(ge=0)] = Field(10.0, description="Cu foil thickness inside the field of view, µm.")
    headroom_um: Annotated[float, Field(ge=0)] = Field(10.0, description="Separator/electrolyte region above the electrode, room for swelling (~21 → ~27 µm), µm.")
    particle_median_diameter_um: PositiveFloat = Field(5.0, description="Median Si particle diameter, µm (seed: 3-7 µm).")
    particle_diameter_log_sigma: Annotated[float, Field(ge=0, le=2)] = Field(0.35, description="σ of ln(diameter) of the lognormal size distribution.")
    si_mass_fraction: Fraction = 0.89
    binder_mass_fraction: Fraction = Field(0.09, description="PAA binder.")
    carbon_black_mass_fraction: Fraction = 0.018
    swcnt_mass_fraction: Fraction = 0.002
    areal_loading_mg_cm2: PositiveFloat = Field(3.0, description="Dry coating mass per area, mg cm⁻².")
    cracked_particle_fraction: Fraction = Field(0.3, description="Fraction of particles cracked by calendering, concentrated near the top (Fig S16).")
    sei_thickness_um: Annotated[float, Field(ge=0)] = 0.05
    mechanism: Literal["core_shell", "pathway"] = Field("pathway", description="Lithiation geometry inside particles (Fig S14); the seed observes pathways.")
    front_width_um: Annotated[float, Field(ge=0)] = Field(0.1, description="Width of the lithiation front, µm.")
    cbd_nanoporosity: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.5, description="Electrolyte-filled volume fraction inside the carbon-binder domain (sub-voxel nanopores).")
    fragment_volume_fraction: Annotated[float, Field(ge=0, le=0.1)] = Field(
        0.01, description="Small Si fragments (0.3-1.2 µm) between large particles, fraction of the electrode volume (part of the Si).")
    lithiated_volume_expansion: Annotated[float, Field(ge=0)] = Field(
        2.8, description="Relative volume change of Si at full lithiation (Li15Si4, x = 3.75), linear in x; 0 switches swelling off.")
    axial_accommodation_fraction: Fraction = Field(
        0.6, description="Share of the Si swelling volume taken up by electrode thickening along z; the rest fills pores.")
    prescribed_deformation_gradient: list[Annotated[list[float], Field(min_length=3, max_length=3)]] | None = Field(
        None, min_length=3, max_length=3,
        description="Homogeneous F (3×3, rows z, y, x) applied about the volume centre at every scan after T0; for accuracy tests.")
    prescribed_axial_strain_gradient_per_um: float = Field(
        0.0, description="Extra axial strain ε_zz = g · (z − z_cu) growing from the current collector at every scan after T0, 1/µm.")
    prescribed_bumps: list[Annotated[list[float], Field(min_length=7, max_length=7)]] = Field(
        [], description="Smooth localized displacement bumps at every scan after T0: [z_um, y_um, x_um, radius_um, uz_um, uy_um, ux_um].")
    gas_bubble_scans: list[str] = Field([], description="Scans showing a transient gas bubble in a pore (seed Fig S13: T2-T4).")
    gas_bubble_radius_um: PositiveFloat = Field(1.5, description="Radius of the gas bubble at those scans, µm.")


class Cell(_Section):
    """The in situ cell (seed Notes 1-2): Si anode against NMC811, both 1.1 mm disks."""

    electrode_diameter_mm: PositiveFloat = 1.1
    anode_capacity_mah_cm2: PositiveFloat = 11.0
    cathode_capacity_mah_cm2: PositiveFloat = 3.5
    cathode_chemistry: Literal["NMC811"] = Field("NMC811", description="Cathode parameters from PyBaMM's Chen2020.")
    model: Literal["DFN", "SPMe", "SPM"] = "DFN"
    series_resistance_ohm: Annotated[float, Field(ge=0)] = Field(
        120000.0,
        description="Extra contact/cell resistance of the micro cell, Ω. The seed gives no value; 120 kΩ makes the C/3 CC step"
        " reach 4.3 V early (Note 2, Fig S4) and the nominal protocol give the seed's T0-T9 (docs/rehearsal.md).",
    )
    leakage_current_ua: Annotated[float, Field(ge=0)] = Field(
        1.0, description="Parasitic (SEI formation) current while charging, µA; it flattens the CV tail (Fig S4)."
    )
    temperature_c: float = Field(25.0, ge=-40, le=80)
    separator_thickness_um: PositiveFloat = Field(25.0, description="Non-woven PP separator as wetted in the stack, µm (assumed).")
    initial_anode_lithiated_fraction: Annotated[float, Field(gt=0, lt=0.1)] = Field(
        0.005, description="Pristine Si lithiation X at assembly (PyBaMM's Si OCP is singular at X = 0)."
    )


class Protocol(_Section):
    """The automated RS232 protocol of Fig S6 and the beamtime around it (seed Notes 2-3)."""

    charge_c_rate: PositiveFloat = Field(1 / 3, description="CC charge rate, C (seed: C/3).")
    upper_cutoff_v: PositiveFloat = 4.3
    cv_current_threshold_c_rate: PositiveFloat = Field(0.1, description="CV ends below this current, C (seed: C/10).")
    discharge_c_rate: PositiveFloat = Field(1 / 6, description="Discharge rate, C (seed: C/6).")
    lower_cutoff_v: PositiveFloat = 2.5
    scan_interval_min: PositiveFloat = Field(30.0, description="Timer between scans in every phase, min.")
    pre_scan_ocv_min: Annotated[float, Field(ge=0)] = Field(1.0, description="OCV pause before each scan, min.")
    scan_duration_min: PositiveFloat = Field(13.0, description="One holo-scan (4 distances), min.")
    max_charge_scans: PositiveInt = Field(6, description="N_max: scans during charge (T1-T6 in the seed).")
    final_scans: PositiveInt = Field(2, description="Back-to-back scans at OCV after discharge (the double scan).")
    beamtime_h: PositiveFloat = Field(72.0, description="Allocated beamtime, h (nine 8-h shifts).")
    shift_h: PositiveFloat = Field(8.0, description="One ESRF shift, h (beamtime is reported in shifts).")
    spare_cells: Annotated[int, Field(ge=0, le=100)] = Field(3, description="Pre-tested spare cells brought to the beamtime.")
    cell_exchange_min: Annotated[float, Field(ge=0)] = Field(
        45.0, description="Dismount a cell, mount a spare, realign the sample on the beam, min (assumed)."
    )
    pretest_cells: PositiveInt = Field(5, description="Identical cells in a pre-test (seed Note 2: five).")
    pretest_required_consistent: PositiveInt = Field(4, description="Cells of a pre-test that must behave consistently (seed: 4 of 5).")
    cell_failure_probability: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        None,
        description="Probability that a cell fails during one scan series; default: the posterior mean implied by"
        " passing the pre-test rule with a uniform prior.",
    )
    failure_mode_shares: dict[str, Fraction] = Field(
        {"short_circuit": 0.4, "seal_leak": 0.3, "contact_loss": 0.3},
        description="Share of each failure mode among failures (assumed; the seed names the modes, not their rates).",
    )
    beam_loss_rate_per_h: Annotated[float, Field(ge=0)] = Field(0.01, description="Unplanned beam losses per hour (assumed).")
    beam_loss_mean_min: PositiveFloat = Field(60.0, description="Mean duration of an unplanned beam loss, min (exponential).")
    refill_period_h: Annotated[float, Field(ge=0)] = Field(12.0, description="Scheduled storage-ring refills every this many h; 0: none.")
    refill_duration_min: Annotated[float, Field(ge=0)] = Field(5.0, description="Beam off during one refill, min.")
    spare_target_probability: Fraction = Field(0.95, description="Wanted probability of at least one complete series when sizing spares.")


class Beamline(_Section):
    """ESRF ID16B holotomography (seed Note 3)."""

    energy_kev: PositiveFloat = 29.6
    energy_bandwidth: Annotated[float, Field(ge=0, lt=1)] = Field(1e-2, description="ΔE/E of the pink beam.")
    propagation_distances_m: list[PositiveFloat] = Field(
        [0.005, 0.0055, 0.0065, 0.008],
        min_length=1,
        description="Effective (parallel-beam equivalent) propagation distances, m. The seed says 'four slightly different"
        " distances' without values; these give Fresnel numbers 0.007-0.012 at 50 nm and 29.6 keV.",
    )
    focus_to_detector_m: PositiveFloat = Field(0.72, description="Cone-beam geometry: focus-to-detector distance, m.")
    n_projections: PositiveInt = 2505
    angular_range_deg: Annotated[float, Field(gt=0, le=360)] = 360.0
    exposure_s: PositiveFloat = 0.02
    flux_photons_per_s: PositiveFloat = 1e12
    n_flats: PositiveInt = 20
    n_darks: PositiveInt = 21
    detector_pixels: PositiveInt = Field(2048, description="PCO Edge 4.2: 2048 × 2048 px.")
    scintillator_thickness_um: PositiveFloat = Field(30.0, description="LSO scintillator.")
    beam_width_um: PositiveFloat = Field(
        102.4, description="Side of the square, flat beam at the sample plane that carries the flux, µm (the seed's 2048 × 50 nm field)."
    )
    native_pixel_size_um: PositiveFloat = Field(
        0.05, description="Unbinned detector pixel in the sample plane, µm (seed: 50 nm); binned scenarios sum (voxel/native)² of them."
    )
    source_size_fwhm_um: Annotated[float, Field(ge=0)] = Field(
        0.05, description="KB focus (source) size, FWHM, µm; blurs the sample plane by size × z2/(z1+z2) (ID16B: ~50 nm)."
    )
    detector_psf_fwhm_um: Annotated[float, Field(ge=0)] = Field(
        0.1, description="Scintillator + optics point spread, FWHM, referred to the sample plane, µm (about 2 native pixels)."
    )
    read_noise_e: Annotated[float, Field(ge=0)] = Field(1.0, description="PCO Edge 4.2 read noise per native pixel, e⁻ rms.")
    dark_current_e_per_s: Annotated[float, Field(ge=0)] = Field(0.6, description="Dark current per native pixel, e⁻ s⁻¹.")
    dark_offset_counts: Annotated[float, Field(ge=0)] = Field(100.0, description="Camera offset added to every frame, counts.")
    gain_sigma: Annotated[float, Field(ge=0, lt=1)] = Field(0.03, description="Pixel-to-pixel gain spread (removed by flats), relative rms.")
    unstable_pixel_fraction: Fraction = Field(
        0.003, description="Pixels whose gain changes after the flats are taken; flat-fielding leaves them as rings."
    )
    unstable_pixel_gain_change: Annotated[float, Field(ge=0, lt=1)] = Field(0.03, description="Relative gain change of those pixels.")
    illumination_nonuniformity: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.05, description="Smooth spatial variation of the beam profile, relative rms."
    )
    beam_drift_fraction: Annotated[float, Field(gt=-1, lt=1)] = Field(
        0.02, description="Linear change of beam intensity from the first to the last frame of a distance, relative."
    )
    jitter_sigma_px: Annotated[float, Field(ge=0)] = Field(0.0, description="Random lateral sample shift per projection, pixels rms.")
    rotation_axis_offset_px: float = Field(
        0.0, ge=-1000, le=1000, description="Rotation axis position minus the detector centre, pixels (known to the twin, estimated by the pipeline)."
    )
    magnification_mode: Literal["corrected", "cone"] = Field(
        "corrected",
        description="'corrected': every distance already on the voxel grid (parallel equivalent); 'cone': each distance keeps its"
        " own magnification (z1+z2)/z1 relative to the first, to be registered by the CTF retrieval.",
    )


class Reconstruction(_Section):
    """Phase retrieval, FBP, ring removal, equalization (seed Note 3)."""

    phase_retrieval: Literal["paganin", "ctf"] = "paganin"
    delta_beta: PositiveFloat = Field(170.0, description="δ/β used for retrieval (the seed's deliberate 170, not Si's ~477).")
    fbp_backend: Literal["auto", "astra", "astra_cuda", "tomopy", "numpy"] = "auto"
    ring_removal: Literal["none", "munch", "vo"] = "munch"
    equalize_histogram: bool = True
    paganin_padding: Literal["zeros", "mean", "edge", "symmetric", "reflect"] = Field(
        "reflect", description="nabu Paganin padding; 'reflect' is robust when the kernel is wider than the image."
    )
    paganin_distance_index: Annotated[int, Field(ge=0)] = Field(0, description="Which propagation distance Paganin uses (0: the first).")
    ctf_lim1: PositiveFloat = Field(1e-5, description="CTF regularization at low frequencies (nabu/HoloTomoToolbox lim1).")
    ctf_lim2: PositiveFloat = Field(0.2, description="CTF regularization at high frequencies (nabu/HoloTomoToolbox lim2).")
    rotation_axis: Literal["estimate", "file"] = Field(
        "estimate", description="Centre of rotation: estimated from opposite projections (nabu), or the file's recorded value."
    )
    munch_sigma: PositiveFloat = Field(1.0, description="Munch et al. wavelet-Fourier deringer damping σ.")
    munch_levels: Annotated[int, Field(ge=1, le=10)] = Field(4, description="Munch deringer wavelet levels (capped at what the sinogram supports).")
    munch_wavelet: Literal["db15", "db10", "db5", "db3", "haar"] = Field(
        "db15", description="Munch deringer wavelet (nabu's default db15; short ones such as db3 suit sinograms under ~200 columns)."
    )
    slab_slices: PositiveInt = Field(
        64, description="Volume z slices processed together (plus a phase-retrieval margin above and below); bounds memory."
    )


class Segmentation(_Section):
    """Attention residual U-Net (seed Note 4)."""

    method: Literal["unet", "otsu", "random_forest"] = "unet"
    n_classes: Literal[2, 3] = Field(
        2, description="2: the seed's Si vs background; 3: background, Si without lithium (crystalline or delithiated) and"
        " lithiated Li_xSi (labels 0, 1, 2), scored per class as well (segmentation.dice_lithiated_si, ...).")
    tile_shape_px: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] = [256, 512]
    n_training_slices: PositiveInt = 12
    slice_planes: list[Literal["yx", "zx", "zy"]] = Field(
        ["yx"], min_length=1, description="Planes the annotated slices are cut from and the 2D network is applied to, "
        "probabilities averaged over them: 'yx' the reconstruction's slices (seed), 'zx'/'zy' vertical slices.")
    augmentations_per_slice: PositiveInt = 3
    epochs: PositiveInt = 150
    batch_size: PositiveInt = 1
    learning_rate: PositiveFloat = 1e-4
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2
    validation_split: Annotated[float, Field(ge=0, lt=1)] = 0.3
    base_filters: PositiveInt = 16
    depth: Annotated[int, Field(ge=1, le=6)] = 4
    second_model_from_scan: Annotated[int, Field(ge=0)] = Field(3, description="Model 1 segments T0..T(n-1), model 2 the rest (seed: 3).")
    tile_overlap_fraction: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        0.125, description="Overlap of neighbouring inference tiles as a fraction of the tile side (blended with linear ramps).")
    inference_batch_size: PositiveInt = Field(8, description="Tiles per forward pass at inference.")
    probability_threshold: Annotated[float, Field(gt=0, lt=1)] = Field(0.5, description="P(Si) above which a voxel is labelled Si.")
    annotation_boundary_jitter_px: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Degraded training labels: rms displacement of the annotated boundaries, px (0: the truth's labels).")
    annotation_min_particle_area_px: Annotated[int, Field(ge=0)] = Field(
        0, description="Degraded training labels: Si regions smaller than this area in a slice are missed by the annotator, px².")
    baselines: list[Literal["otsu", "random_forest"]] = Field(
        ["otsu", "random_forest"], description="Baseline segmentations also written to labels.nc for comparison.")
    random_forest_n_estimators: PositiveInt = Field(50, description="Trees of the random-forest baseline.")


class DIC(_Section):
    """spam registration and hierarchical local DIC (seed Note 5)."""

    node_spacing_px: list[PositiveInt] = Field([100, 70, 35], min_length=1, description="Coarse to fine, voxels.")
    window_half_size_px: list[PositiveInt] | None = Field(None, description="Per level; default: half the node spacing.")
    registration_max_iterations: PositiveInt = 3000
    registration_max_voxels: PositiveInt = Field(
        2**24, description="The eye registration and spam's registration (a first guess for the LDIC) run on the pair "
        "binned by the smallest power of 2 that leaves at most this many voxels (whole-volume registration holds ~14 "
        "float32 volumes; binning by 8 makes that negligible at the seed's size).")
    max_iterations: PositiveInt = 3000
    delta_phi_tolerance: PositiveFloat = 1e-4
    margin_px: Annotated[int, Field(ge=1)] = Field(3, description="Search margin of the first LDIC attempt, px (spam-ldic's default);"
                                                   " the retries use retry_margins_px.")
    retry_margins_px: list[Annotated[int, Field(ge=0)]] = [10, 20, 30, 40]
    retry_max_iterations: list[PositiveInt] = [1000, 2000, 3000]
    residual_blur_sigma_px: Annotated[float, Field(ge=0)] = 2.0
    filter_neighbours: PositiveInt = Field(9, description="Converged neighbours that replace a failed or incoherent node (seed: 9).")
    coherency_threshold: PositiveFloat = Field(0.1, description="Local quadratic coherency above which a converged node is an outlier (Masullo & Theunissen 2016: 0.1).")
    min_converged_fraction: Fraction = Field(0.5, description="A level whose converged fraction of textured nodes is below this is retried (seed: 'majority').")
    noise_percentile: Annotated[float, Field(gt=0, lt=100)] = Field(99.0, description="Percentile of the blurred |residual| of the double scan taken as the noise threshold, %.")
    processes: PositiveInt | None = Field(None, description="Processes for spam's multiprocessing; default: all CPUs (1 inside a Dask worker).")
    interpolation_order: Literal[1, 3] = Field(1, description="Grey-level interpolation of spam's LDIC (spam-ldic's default 1; 3 halves the"
                                                " sub-voxel bias at ~6x the time).")


class Validation(_Section):
    """Scoring against the truth."""

    tolerances_file: str | None = Field(None, description="TOML of metric bounds; default: the package's validation/tolerances.toml.")
    voi_size_um: PositiveFloat = Field(15.0, description="Edge of the particle-centred VOIs (Fig S12).")
    particle_watershed_level: Annotated[float, Field(ge=0)] = Field(
        0.5, description="Depth, voxels, below which distance-map maxima merge when spam.label.watershed splits touching"
        " Si particles (tracking, mechanism classifier); 0 keeps connected components.")
    error_budget: bool = Field(
        True, description="`twin run` also reruns the chain with the truth substituted stage by stage (the `oracle` section)"
        " and reports how much of each final error every stage contributes (budget.<stage>.<metric>).")


class Oracle(_Section):
    """Truth substituted for a stage's product: the error budget's ablations. All off in a real twin."""

    noise_free_holograms: bool = Field(
        False, description="Holograms without photon, dark-current and read noise (blur, detector defects, drift and rings kept).")
    true_delta: bool = Field(
        False, description="The reconstruction stage returns the true δ (histogram-equalized like a reconstruction) instead of reconstructing.")
    true_labels: bool = Field(False, description="The segmentation stage returns the true Si mask instead of segmenting.")


class Run(_Section):
    """Execution: seed, parallelism, cache."""

    seed: Annotated[int, Field(ge=0, lt=2**63)] = 20240607
    workers: Annotated[int, Field(ge=1, le=1024)] = 1
    scheduler: str | None = Field(None, description="Address of an existing Dask scheduler; default: a LocalCluster when workers > 1.")
    cache_dir: str | None = Field(None, description="Stage cache; default: OUT/cache.")


class Scenario(_Section):
    """A whole twin. Sections default to the seed's values."""

    name: str = "custom"
    description: str = ""
    sample: Sample = Sample()
    cell: Cell = Cell()
    protocol: Protocol = Protocol()
    beamline: Beamline = Beamline()
    reconstruction: Reconstruction = Reconstruction()
    segmentation: Segmentation = Segmentation()
    dic: DIC = DIC()
    validation: Validation = Validation()
    oracle: Oracle = Oracle()
    run: Run = Run()

    @model_validator(mode="after")
    def _coupled(self) -> Scenario:
        problems = check_coupled(self)
        if problems:
            # A ValueError here becomes a pydantic error; raise ours directly to keep the paths.
            raise _CoupledProblems(problems)
        return self

    # Derived geometry, in voxels -------------------------------------------------
    @property
    def volume_shape(self) -> tuple[int, int, int]:
        """Phantom and reconstruction shape (z, y, x) in voxels; z is the electrode normal."""
        s = self.sample
        height_um = s.current_collector_thickness_um + s.electrode_thickness_um + s.headroom_um
        lateral = round(s.lateral_size_um / s.voxel_size_um)
        return (round(height_um / s.voxel_size_um), lateral, lateral)

    @property
    def wavelength_m(self) -> float:
        """X-ray wavelength λ = hc/E, m."""
        return 1.239841984e-6 / (self.beamline.energy_kev * 1e3)

    def fresnel_numbers(self) -> list[float]:
        """Fresnel number a²/(λz) of one voxel at each propagation distance."""
        a_m = self.sample.voxel_size_um * 1e-6
        return [a_m**2 / (self.wavelength_m * z) for z in self.beamline.propagation_distances_m]

    def get(self, dotted: str, _dump: dict[str, Any] | None = None) -> Any:
        """The value at a dotted field path (``"dic.node_spacing_px"``), as plain Python data."""
        value: Any = _dump if _dump is not None else self.model_dump(mode="json")
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ScenarioError(f"{dotted}: no such field{_suggest(part, value if isinstance(value, dict) else {})}")
            value = value[part]
        return value


class _CoupledProblems(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


#: A volume side beyond this many voxels is refused (the seed's largest is 2048).
MAX_VOXELS_PER_SIDE = 100_000


def check_coupled(sc: Scenario) -> list[str]:
    """Second validation pass: relations between fields (each field is already valid alone)."""
    problems: list[str] = []
    s, p, d, b = sc.sample, sc.protocol, sc.dic, sc.beamline
    # first, and alone: the checks below (and volume_shape) divide extents by the voxel size
    height_um = s.current_collector_thickness_um + s.electrode_thickness_um + s.headroom_um
    for name, extent in (("sample.lateral_size_um", s.lateral_size_um),
                         ("sample height (current_collector_thickness_um + electrode_thickness_um + headroom_um)", height_um)):
        if not extent / s.voxel_size_um <= MAX_VOXELS_PER_SIDE:
            return [f"{name}: {extent} µm is more than {MAX_VOXELS_PER_SIDE} voxels of sample.voxel_size_um = "
                    f"{s.voxel_size_um} µm"]
    total = s.si_mass_fraction + s.binder_mass_fraction + s.carbon_black_mass_fraction + s.swcnt_mass_fraction
    if not math.isclose(total, 1.0, abs_tol=1e-3):
        problems.append(f"sample.*_mass_fraction: must add up to 1, got {total:.4g}")
    if s.particle_median_diameter_um > s.electrode_thickness_um:
        problems.append(
            f"sample.particle_median_diameter_um: must not exceed sample.electrode_thickness_um "
            f"({s.electrode_thickness_um}), got {s.particle_median_diameter_um}"
        )
    for name in ("lateral_size_um", "electrode_thickness_um", "particle_median_diameter_um"):
        if getattr(s, name) < 4 * s.voxel_size_um:
            problems.append(f"sample.{name}: must span at least 4 voxels of {s.voxel_size_um} µm, got {getattr(s, name)}")
    if p.lower_cutoff_v >= p.upper_cutoff_v:
        problems.append(f"protocol.lower_cutoff_v: must be below protocol.upper_cutoff_v ({p.upper_cutoff_v}), got {p.lower_cutoff_v}")
    if p.cv_current_threshold_c_rate >= p.charge_c_rate:
        problems.append(
            f"protocol.cv_current_threshold_c_rate: must be below protocol.charge_c_rate ({p.charge_c_rate:.4g}) "
            f"or the CV step could never end on current, got {p.cv_current_threshold_c_rate}"
        )
    if p.pre_scan_ocv_min >= p.scan_interval_min:
        problems.append(f"protocol.pre_scan_ocv_min: must be shorter than protocol.scan_interval_min ({p.scan_interval_min}), got {p.pre_scan_ocv_min}")
    problems.extend(_check_protocol(sc))
    if len(set(b.propagation_distances_m)) != len(b.propagation_distances_m):
        problems.append(f"beamline.propagation_distances_m: distances must differ, got {b.propagation_distances_m}")
    for i, z in enumerate(b.propagation_distances_m):
        if z >= b.focus_to_detector_m:
            problems.append(f"beamline.propagation_distances_m[{i}]: must be < beamline.focus_to_detector_m ({b.focus_to_detector_m}), got {z}")
    if b.detector_pixels * s.voxel_size_um < s.lateral_size_um - 1e-9:
        problems.append(
            f"beamline.detector_pixels: {b.detector_pixels} px of {s.voxel_size_um} µm cannot see "
            f"sample.lateral_size_um = {s.lateral_size_um}, need >= {math.ceil(s.lateral_size_um / s.voxel_size_um)}"
        )
    g = sc.segmentation
    for i, n in enumerate(g.tile_shape_px):
        if n % 2**g.depth:
            problems.append(f"segmentation.tile_shape_px[{i}]: must be divisible by 2**segmentation.depth ({2**g.depth}), got {n}")
    spacings = d.node_spacing_px
    if any(a <= b_ for a, b_ in zip(spacings, spacings[1:])):
        problems.append(f"dic.node_spacing_px: must decrease from coarse to fine, got {spacings}")
    if d.window_half_size_px is not None and len(d.window_half_size_px) != len(spacings):
        problems.append(
            f"dic.window_half_size_px: needs one value per level of dic.node_spacing_px ({len(spacings)}), got {d.window_half_size_px}"
        )
    shape = sc.volume_shape
    if spacings and spacings[0] * 2 > min(shape):
        problems.append(
            f"dic.node_spacing_px[0]: two nodes must fit in the smallest volume side ({min(shape)} voxels), got {spacings[0]}"
        )
    return problems


FAILURE_MODES = ("short_circuit", "seal_leak", "contact_loss")


def _check_protocol(sc: Scenario) -> list[str]:
    """Refuse cells and protocols that could never finish a scan series (issue 4)."""
    problems: list[str] = []
    c, p = sc.cell, sc.protocol
    capacity_ua_h = c.cathode_capacity_mah_cm2 * 1e3 * math.pi * (c.electrode_diameter_mm / 20) ** 2
    charge_ua = p.charge_c_rate * capacity_ua_h
    if c.leakage_current_ua >= charge_ua:
        problems.append(
            f"cell.leakage_current_ua: must be below the CC charge current protocol.charge_c_rate x capacity "
            f"({charge_ua:.3g} µA) or the cell never charges, got {c.leakage_current_ua}"
        )
    scan_h = (p.pre_scan_ocv_min + p.scan_duration_min) / 60
    shortest_h = p.scan_duration_min / 60 + (p.max_charge_scans + p.final_scans) * scan_h
    if shortest_h > p.beamtime_h:
        problems.append(
            f"protocol.beamtime_h: even a series without any cycling (T0, {p.max_charge_scans} charge scans, "
            f"{p.final_scans} final scans) needs {shortest_h:.3g} h, got {p.beamtime_h}"
        )
    if p.pretest_required_consistent > p.pretest_cells:
        problems.append(
            f"protocol.pretest_required_consistent: must not exceed protocol.pretest_cells ({p.pretest_cells}), "
            f"got {p.pretest_required_consistent}"
        )
    unknown = sorted(set(p.failure_mode_shares) - set(FAILURE_MODES))
    if unknown:
        problems.append(f"protocol.failure_mode_shares: unknown mode(s) {unknown}; modes are {list(FAILURE_MODES)}")
    total = sum(p.failure_mode_shares.values())
    if not p.failure_mode_shares or not math.isclose(total, 1.0, abs_tol=1e-6):
        problems.append(f"protocol.failure_mode_shares: shares must add up to 1, got {total:.4g}")
    return problems


# Loading ---------------------------------------------------------------------------


def bundled_path(name: str) -> Path:
    """Path of a bundled scenario file."""
    return Path(str(resources.files("scenarios").joinpath(f"{name}.toml")))


def _read_toml(source: str | Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a scenario file (or bundled name), following ``base = ...`` chains."""
    if isinstance(source, str) and source in BUNDLED and not Path(source).exists():
        path = bundled_path(source)
    else:
        path = Path(source)
        if not path.exists():
            hint = _suggest(str(source), {k: None for k in BUNDLED})
            raise ScenarioError(f"{source}: no such file and not a bundled scenario ({', '.join(BUNDLED)}){hint}")
    key = str(path.resolve())
    if key in seen:
        raise ScenarioError(f"base: circular chain {' -> '.join(seen + (key,))}", source=str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: not valid TOML ({exc})", source=str(path)) from None
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ScenarioError(f"base: must be a scenario name or path, got {base!r}", source=str(path))
    base_source: str | Path = base if base in BUNDLED else path.parent / base
    return _merge(_read_toml(base_source, seen + (key,)), data)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """Parse one ``--set dotted.key=value``.

    The value is read as a TOML value (``3``, ``1e-4``, ``true``, ``[20,10]``,
    ``"text"``); anything that is not valid TOML is taken as a plain string.
    A path part may index a list: ``beamline.propagation_distances_m[2]=0.006``.
    """
    if "=" not in text:
        raise ScenarioError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key or any(not part for part in key.split(".")):
        raise ScenarioError(f"--set {text!r}: empty field name")
    path: list[str | int] = []
    for part in key.split("."):
        name, _, rest = part.partition("[")
        path.append(name)
        while rest:
            index, _, rest = rest.partition("]")
            if not (index.isascii() and index.isdigit()) or (rest and not rest.startswith("[")):  # "²".isdigit()
                raise ScenarioError(f"--set {text!r}: bad index in {part!r}")
            path.append(int(index))
            rest = rest[1:]
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` strings to a raw scenario mapping (validation comes after)."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path):
            shown = _format_path(path[: i + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise ScenarioError(f"{shown}: no such list element")
            else:
                model = _model_at(path[:i])
                if model is not None and part not in model.model_fields:
                    raise ScenarioError(f"{shown}: unknown field{_suggest(part, model.model_fields)}")
                if not isinstance(node, dict):
                    raise ScenarioError(f"{shown}: {_format_path(path[:i])} is not a table")
            if i == len(path) - 1:
                node[part] = value
            else:
                if isinstance(part, str) and part not in node:
                    # not in the file: start from the section ({}) or the field's default (a list to index)
                    node[part] = {} if _model_at(path[: i + 1]) is not None else copy.deepcopy(_default_at(path[: i + 1]))
                node = node[part]
    return data


def _format_path(path) -> str:
    shown = ""
    for part in path:
        shown = f"{shown}[{part}]" if isinstance(part, int) else (f"{shown}.{part}" if shown else str(part))
    return shown or "scenario"


def _model_at(path: list[str | int]) -> type[BaseModel] | None:
    model: Any = Scenario
    for part in path:
        if not (isinstance(part, str) and isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _default_at(path: list[str | int]) -> Any:
    return Scenario().get(".".join(str(p) for p in path))


def load_scenario(source: str | Path = "quickstart", overrides: list[str] | None = None) -> Scenario:
    """Read, merge, override and validate a scenario.

    Parameters
    ----------
    source
        A bundled name (``tiny``, ``quickstart``, ``core_shell``, ``pathway``,
        ``paper``) or a path to a TOML file.
    overrides
        ``dotted.key=value`` strings, applied before validation.

    Raises
    ------
    ScenarioError
        With one line per problem, each naming the field path and the bad value.

    Examples
    --------
    >>> sc = load_scenario("tiny", ["reconstruction.delta_beta=300"])
    >>> sc.reconstruction.delta_beta
    300.0
    """
    data = _read_toml(source)
    data = apply_overrides(data, list(overrides or []))
    if "name" not in data:
        data["name"] = source if isinstance(source, str) and source in BUNDLED else Path(source).stem
    return validate(data, source=str(source))


def validate(data: Any, source: str | None = None) -> Scenario:
    """Validate a raw mapping into a :class:`Scenario` or raise :class:`ScenarioError`."""
    if not isinstance(data, dict):
        raise ScenarioError(f"scenario: must be a table of sections, got {type(data).__name__}", source=source)
    try:
        return Scenario.model_validate(data)
    except _CoupledProblems as exc:
        raise ScenarioError(exc.problems, source=source) from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            if isinstance(err.get("ctx", {}).get("error"), _CoupledProblems):
                problems.extend(err["ctx"]["error"].problems)
            else:
                problems.append(_describe(err))
        raise ScenarioError(problems, source=source) from None


def _describe(err: dict[str, Any]) -> str:
    loc = err["loc"]
    path = _format_path(loc)
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        model = _model_at([p for p in loc[:-1] if isinstance(p, str)])
        fields = model.model_fields if model is not None else {}
        return f"{path}: unknown field{_suggest(str(loc[-1]), fields)}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        key = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}[kind]
        what = f"must be {bounds[kind]} {ctx[key]:g}"
    elif kind == "finite_number":
        what = "must be a finite number"
    elif kind == "literal_error":
        what = f"must be one of {ctx.get('expected')}"
    elif kind in ("too_short", "too_long"):
        what = f"must have {'at least' if kind == 'too_short' else 'at most'} {ctx.get('min_length', ctx.get('max_length'))} items"
    else:
        what = err["msg"][0].lower() + err["msg"][1:]
    return f"{path}: {what}, got {value!r}"


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def to_toml(sc: Scenario) -> str:
    """The resolved scenario as TOML (every field, defaults included)."""
    import tomli_w

    data = sc.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)
