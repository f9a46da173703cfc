"""Synthetic Si-anode electrodes with known lithiation and deformation: the twin's truth (issue #3)."""
