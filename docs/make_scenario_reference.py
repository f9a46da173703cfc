"""Regenerate docs/scenario.md from the schema: python docs/make_scenario_reference.py > docs/scenario.md"""

from twin.scenario import Scenario

HEADER = """# Scenario reference

A scenario is one TOML file with the sections below (`twin check NAME` prints a resolved one).
Every default is the seed's value where the seed gives one (Häusler et al., Supplementary Notes 1–5);
the bundled `paper` scenario is exactly these defaults. `base = "quickstart"` at the top of a file
starts from another scenario. Unknown keys are refused with a suggestion; every error names the
field path, e.g. `beamline.propagation_distances_m[2]: must be > 0, got -0.01`.

Fields whose names are fixed by the contract (users' sweeps name them): `run.seed`,
`reconstruction.delta_beta`, `dic.node_spacing_px`, `beamline.n_projections`,
`beamline.propagation_distances_m`, `beamline.energy_kev`.

This page is generated from `twin/scenario.py`; a test keeps the two equal.
"""


def reference_markdown() -> str:
    lines = [HEADER]
    for section, field in Scenario.model_fields.items():
        model = field.annotation
        if not hasattr(model, "model_fields"):
            continue
        lines.append(f"## `{section}` — {model.__doc__.strip().splitlines()[0]}\n")
        lines.append("| field | default | meaning |\n| --- | --- | --- |")
        default = model()
        for name, f in model.model_fields.items():
            meaning = (f.description or "").replace("|", "/")
            lines.append(f"| `{section}.{name}` | `{getattr(default, name)!r}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
