"""Scores of the pipeline's products against the phantom's truth; the only package that sees both."""
