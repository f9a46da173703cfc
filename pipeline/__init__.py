"""The real analysis chain (reconstruction, segmentation, DIC); never reads the truth, runs on beamline data too."""
