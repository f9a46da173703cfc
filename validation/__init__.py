"""Scores of the pipeline's products against the phantom's truth; the only package that sees both."""

#: The metrics a run is summarized by: `twin run`'s closing lines and the report's ablation table
#: (which leaves out the ``truth.*`` ones: they do not change between ablations).
HEADLINE_METRICS: tuple[str, ...] = (
    "recon.delta_pearson.mean", "recon.resolution_fwhm_nm", "truth.resolution_fwhm_nm", "segmentation.dice_si.mean",
    "dic.displacement_rmse_vx.max", "dic.volumetric_strain_mae.max", "tracking.axial_displacement_rmse_um",
    "lithiation.mechanism_accuracy",
)
