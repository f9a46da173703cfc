"""Core–shell or pathway? A per-particle classifier from reconstructed grey values alone (seed Figs S14, S15).

Physics: lithiated Li_xSi is less dense than crystalline Si, so it reconstructs
darker (lower δ). In the core–shell mechanism the dark phase is a shell: grey
value inside a particle is ordered by the distance d to the particle's surface
(dark outside, bright core). In the pathway mechanism it forms planar bands
that cross the particle: dark voxels sit at every depth, and the grey value is
not a function of d.

Features of one segmented particle (holes filled, so dark bands inside count
as particle), on grey values g normalised so that the pore material is 0 and
the crystalline Si level (the particle's own 90th percentile) is 1, over the
voxels with d ≥ 1 (the surface voxel layer is all partial volume for both
mechanisms):

1. Pearson correlation of g with d;
2. radial R²: the share of the variance of g explained by its mean on shells
   of constant d (1-voxel bins);
3. the share of those voxels that are dark (g < ½);
4. mean d of the dark voxels over mean d of all voxels (≈ 1 for bands that
   cross the particle, < 1 for a shell), 1 when none is dark.

A logistic regression (scikit-learn) on these features is trained on
synthetic particles of both mechanisms made with :mod:`phantoms.lithiation`
(the same front model as the truth), blurred with the run's *measured*
resolution and given the run's *measured* noise (both from the reconstruction,
never from the truth), so the classifier matches the data it is applied to.

Metric: ``lithiation.mechanism_accuracy`` = the fraction of segmented
particles (of the most charged scan) whose predicted mechanism is the true one
(``phantom.nc`` attrs ``mechanism``), over the particles that overlap a truly
lithiated particle (``particles.csv`` ``max_lithiated_fraction`` ≥ 0.05).

Written by hand: no library classifies lithiation geometry; the geometry keys
are :mod:`phantoms.lithiation`'s, the classifier scikit-learn's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from pipeline.segmentation import si_from_labels
from pipeline.tracking import read_particle_labels

MECHANISMS = ("core_shell", "pathway")
FEATURES = ("radial_correlation", "radial_r2", "dark_share", "dark_depth_ratio")
_111 = np.array([[1, 1, 1], [1, -1, 1], [1, 1, -1], [-1, 1, 1]]) / np.sqrt(3)
MIN_DEPTH_PX = 1.0  # the surface voxel layer (EDT < 1) is all partial volume for both mechanisms


def particle_features(grey: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The four features of one particle (see module docstring), or None when it has too few interior voxels.

    Parameters
    ----------
    grey : float array
        Normalised grey values (pore material 0, crystalline Si 1) in a box around the particle.
    mask : bool array
        The particle (holes filled) in the same box.
    """
    depth = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    inner = depth >= MIN_DEPTH_PX
    if inner.sum() < 20:
        return None
    g, d = grey[inner].astype(float), depth[inner]
    if g.std() == 0 or d.std() == 0:
        return None
    corr = float(np.corrcoef(g, d)[0, 1])
    bins = np.floor(d).astype(int)
    counts = np.bincount(bins)
    means = np.bincount(bins, g) / np.maximum(counts, 1)
    r2 = float(np.sum(counts * (means - g.mean()) ** 2) / np.sum((g - g.mean()) ** 2))
    dark = g < 0.5
    ratio = float(d[dark].mean() / d.mean()) if dark.any() else 1.0
    return np.array([corr, r2, float(dark.mean()), ratio])


def _blob(diameter_px: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular particle: a sphere with a smooth random radius modulation (±15 %), padded by 4 voxels."""
    n = int(np.ceil(diameter_px * 1.3)) + 8
    r = np.linalg.norm(np.indices((n, n, n)) - (n - 1) / 2, axis=0)
    wobble = ndi.gaussian_filter(rng.standard_normal((n, n, n)), max(diameter_px / 4, 1.0))
    wobble *= 0.15 / max(wobble.std(), 1e-12)
    return r <= diameter_px / 2 * (1 + wobble)


def mechanism_key(mask: np.ndarray, mechanism: str, rng: np.random.Generator, *, voxel_size_um: float) -> np.ndarray:
    """Lithiation key of each particle voxel, as ``phantoms.microstructure`` builds it.

    core_shell: distance to the surface; pathway: distance to the nearest of 2–3
    families of {111} band planes of a random crystal orientation, one more
    plane per 1.5 µm of radius, with 0.5-voxel smooth roughness.
    """
    if mechanism == "core_shell":
        return ndi.distance_transform_edt(mask)[mask]
    if mechanism != "pathway":
        raise ValueError(f"mechanism: expected one of {MECHANISMS}, got {mechanism!r}")
    pts = np.argwhere(mask).astype(float)
    c = pts.mean(axis=0)
    r_eq = (3 * len(pts) / (4 * np.pi)) ** (1 / 3)
    q, rr = np.linalg.qr(rng.standard_normal((3, 3)))
    rot = q * np.sign(np.diag(rr))
    normals, offsets = [], []
    for f in rng.choice(4, size=rng.integers(2, 4), replace=False):
        n_par = 1 + int(r_eq // max(2.0, 1.5 / voxel_size_um))
        o = (np.arange(n_par) - (n_par - 1) / 2) * (2 * r_eq / (n_par + 1)) + rng.normal(0, 0.2 * r_eq)
        normals += [rot @ _111[f]] * n_par
        offsets += list(o)
    normals, offsets = np.array(normals), np.array(offsets)
    dist = np.abs((pts - c) @ normals.T - offsets[None]).min(axis=1)
    rough = ndi.gaussian_filter(rng.standard_normal(mask.shape), 0.8)[mask]
    return (dist + 0.5 * rough / max(rough.std(), 1e-12)).clip(0)


def synthetic_particle(mechanism: str, *, diameter_px: float, fraction: float, blur_sigma_px: float,
                       noise: float, voxel_size_um: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic charged particle: normalised grey image (pore 0, c-Si 1) and its mask.

    The Li content x comes from :func:`phantoms.lithiation.lithiate_particle`
    (sharp front); grey = 1 − x/3.75 inside (fully lithiated Li₁₅Si₄ reconstructs
    at about the pore level: δ ≈ 3.4e-7 against 3.2–3.5e-7 for electrolyte and
    CBD and 4.9e-7 for c-Si at 29.6 keV, ``phantoms.optics``), 0 outside; then a
    Gaussian blur of ``blur_sigma_px`` and white noise of standard deviation ``noise``.
    """
    from phantoms.lithiation import lithiate_particle
    from phantoms.optics import X_FULL

    mask = _blob(diameter_px, rng)
    key = mechanism_key(mask, mechanism, rng, voxel_size_um=voxel_size_um)
    x, _ = lithiate_particle(key, fraction, fraction, 0.0)
    image = np.zeros(mask.shape)
    image[mask] = 1.0 - x / X_FULL
    image = ndi.gaussian_filter(image, blur_sigma_px) + rng.normal(0.0, noise, mask.shape)
    return image, mask


def train_classifier(*, blur_sigma_px: float, noise: float, diameters_px: np.ndarray, voxel_size_um: float,
                     rng: np.random.Generator, n_per_class: int = 40, fraction_range=(0.05, 0.5)):
    """Logistic regression on the features of synthetic particles of both mechanisms.

    Parameters
    ----------
    blur_sigma_px, noise
        Blur (voxels) and noise (normalised grey units) of the data to classify.
    diameters_px
        Particle diameters to draw from (voxels), e.g. those of the segmented particles.
    n_per_class
        Synthetic particles per mechanism.

    Returns
    -------
    sklearn.pipeline.Pipeline
        Standardisation + logistic regression; classes 0 = core_shell, 1 = pathway.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = synthetic_features(blur_sigma_px=blur_sigma_px, noise=noise, diameters_px=diameters_px,
                              voxel_size_um=voxel_size_um, rng=rng, n_per_class=n_per_class, fraction_range=fraction_range)
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)


def synthetic_features(*, blur_sigma_px, noise, diameters_px, voxel_size_um, rng, n_per_class=60,
                       fraction_range=(0.05, 0.5)) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, 4) and labels (0 core_shell, 1 pathway) of synthetic particles."""
    X, y = [], []
    for label, mech in enumerate(MECHANISMS):
        made = 0
        while made < n_per_class:
            image, mask = synthetic_particle(mech, diameter_px=float(rng.choice(diameters_px)),
                                             fraction=float(rng.uniform(*fraction_range)), blur_sigma_px=blur_sigma_px,
                                             noise=noise, voxel_size_um=voxel_size_um, rng=rng)
            f = particle_features(image, mask)
            if f is not None:
                X.append(f)
                y.append(label)
                made += 1
    return np.array(X), np.array(y)


def interior_particles(particle_labels: np.ndarray, *, min_diameter_px: float = 6.0) -> list[int]:
    """Ids of the particles worth classifying in a particle label image (:func:`pipeline.tracking.split_particles`).

    Kept: regions of equivalent diameter ≥ ``min_diameter_px`` (an interior
    exists) that do not touch the volume's faces (cut particles and the
    mislabelled Cu foil or separator would be misread).
    """
    lab = particle_labels
    n = int(lab.max())
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    border = set(np.unique(np.concatenate([lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(), lab[:, -1].ravel(),
                                           lab[:, :, 0].ravel(), lab[:, :, -1].ravel()])).tolist())
    min_voxels = np.pi / 6 * min_diameter_px**3
    return [i for i in range(1, n + 1) if sizes[i] >= min_voxels and i not in border]


def classify_volume(volume: np.ndarray, labels: np.ndarray, particle_labels: np.ndarray, *, blur_sigma_px: float,
                    voxel_size_um: float, rng: np.random.Generator) -> list[dict]:
    """Predict the mechanism of every large segmented particle of one reconstructed volume.

    Parameters
    ----------
    volume : (z, y, x) float array
        Reconstructed grey values (``volume.nc`` ``delta``).
    labels : (z, y, x) bool array
        Segmented Si.
    particle_labels : (z, y, x) int array
        ``labels`` split into particles (:func:`pipeline.tracking.split_particles`); those of
        :func:`interior_particles` are classified.
    blur_sigma_px : float
        Gaussian σ of the reconstruction's measured resolution, voxels.

    Returns
    -------
    list of dict
        Per particle: ``component``, ``centre_px`` (z, y, x), ``diameter_px``, the features, ``predicted``, ``p_pathway``.
    """
    from skimage.restoration import estimate_sigma

    lab, ids = particle_labels, interior_particles(particle_labels)
    objs = ndi.find_objects(lab)
    # Normalised per particle: pore level 0 (median of the non-Si voxels), c-Si 1 (the particle's 90th percentile),
    # so a bright neighbour (Cu foil) or a slow drift of the grey scale does not shift the dark/bright split.
    pore = float(np.median(volume[~labels]))
    rows, feats, contrasts = [], [], []
    for i in ids:
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in objs[i - 1])
        mask = ndi.binary_fill_holes(lab[sl] == i)
        contrast = float(np.percentile(volume[sl][mask], 90)) - pore
        if contrast <= 0:
            continue
        contrasts.append(contrast)
        f = particle_features((volume[sl] - pore) / contrast, mask)
        if f is None:
            continue
        centre = np.array(ndi.center_of_mass(mask)) + [s.start for s in sl]
        rows.append({"component": int(i), "centre_px": centre, "diameter_px": float((6 * mask.sum() / np.pi) ** (1 / 3))})
        feats.append(f)
    if not rows:
        return []
    diameters = np.array([r["diameter_px"] for r in rows])
    noise = float(estimate_sigma(volume)) / float(np.median(contrasts))  # in normalised units
    model = train_classifier(blur_sigma_px=blur_sigma_px, noise=noise, diameters_px=diameters,
                             voxel_size_um=voxel_size_um, rng=rng)
    p = model.predict_proba(np.array(feats))[:, 1]
    for r, f, pk in zip(rows, feats, p):
        r.update(dict(zip(FEATURES, map(float, f))))
        r["p_pathway"] = float(pk)
        r["predicted"] = MECHANISMS[int(pk >= 0.5)]
    return rows


def majority_label(components: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """For each component (> 0) of ``components``: the label (> 0) of ``labels`` under most of its voxels.

    Ties go to the smaller label (``np.bincount(...).argmax()``'s rule); components
    over no labelled voxel are left out. One pass over the volumes, whatever
    the number of components.
    """
    both = (components > 0) & (labels > 0)
    comp = components[both].astype(np.int64)
    lab = labels[both].astype(np.int64)
    del both
    base = int(lab.max(initial=0)) + 1
    pairs, counts = np.unique(comp * base + lab, return_counts=True)
    comp, lab = np.divmod(pairs, base)
    # per component, the largest count; among equal counts the smallest label (pairs are sorted by label)
    order = np.lexsort((lab, -counts, comp))
    first = np.ones(len(order), bool)
    first[1:] = comp[order][1:] != comp[order][:-1]
    return dict(zip(comp[order][first].tolist(), lab[order][first].tolist()))


def mechanism_metrics(volume_nc, labels_nc, particle_labels_nc, truth_nc, particles_csv, *, blur_sigma_px: float,
                      rng: np.random.Generator, min_fraction: float = 0.05) -> dict[str, float]:
    """``lithiation.mechanism_accuracy`` of one charged scan (see module docstring), with the counts behind it."""
    import pandas as pd
    import xarray as xr

    with xr.open_dataset(volume_nc, engine="h5netcdf") as ds:
        volume = ds["delta"].values.astype(np.float64)
        voxel = float(ds.attrs["voxel_size_um"])
    with xr.open_dataset(labels_nc, engine="h5netcdf") as ds:
        labels = si_from_labels(ds["labels"].values)
    lab = read_particle_labels(Path(particle_labels_nc))
    rows = classify_volume(volume, labels, lab, blur_sigma_px=blur_sigma_px, voxel_size_um=voxel, rng=rng)
    # truth: only here, after the classification
    with xr.open_dataset(truth_nc, engine="h5netcdf") as ds:
        true_particle = ds["particle"].values
        mechanism = str(ds.attrs["mechanism"])
    table = pd.read_csv(particles_csv)
    lithiated = set(table.loc[table["max_lithiated_fraction"] >= min_fraction, "id"].astype(int))
    majority = majority_label(lab, true_particle)
    correct = []
    for r in rows:
        if majority.get(int(r["component"]), 0) in lithiated:
            correct.append(r["predicted"] == mechanism)
    out = {"lithiation.mechanism_n_particles": float(len(correct)),
           "lithiation.mechanism_pathway_share": float(np.mean([r["predicted"] == "pathway" for r in rows])) if rows else np.nan}
    out["lithiation.mechanism_accuracy"] = float(np.mean(correct)) if correct else float("nan")
    return out
