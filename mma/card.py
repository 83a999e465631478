"""The ``README.md`` card of an exported adapter, generated from its ``adapter_config.json`` description."""

import inspect
import json

from mma.adapters import get_adapter, settings_from_spec


def method_summary(name: str) -> str:
    """First line of the docstring of the file that defines the method: its name and paper."""
    module = inspect.getmodule(get_adapter(name).attach)
    return (module.__doc__ or name).strip().splitlines()[0]


def adapter_card(description: dict, recipe: str | None) -> str:
    """Markdown with a Hugging Face style front matter: method, backbones, size, training, metrics, licence."""
    model, backbones, weights = description["model"], description["backbones"], description["weights"]
    training, licence = description["training"], description["license"]
    name = type(settings_from_spec(model["adapter"])).name
    lines = [
        "---",
        "library_name: mma",
        f"license: {licence}",
        f"tags: [mma, {name}, adapter, vision-language]",
        "---",
        "",
        f"# {name} adapter for {backbones['llm']['name']}",
        "",
        f"Method: **{name}**, {method_summary(name)}",
        f"Settings: `{json.dumps(model['adapter']['init_args'])}`; visual tokens: `{json.dumps(model['visual'])}`.",
        "",
        "## Backbones (frozen, not included; fingerprints in adapter_config.json)",
        "",
        "| part | as given | parameters | weights sha256 |",
        "|---|---|---|---|",
        *(_backbone_row(part, backbones[part]) for part in ("llm", "vit")),
        "",
        f"Trainable parameters: **{weights['parameters']:,}** in {weights['tensors']} tensors, "
        f"{weights['bytes'] / 1e6:.2f} MB (`{weights['file']}`).",
        "",
        "## Training",
        "",
        *_training_lines(training, recipe),
        "",
        "## Use",
        "",
        "```bash",
        'mma ask --adapter THIS_FOLDER --image picture.png "What colour is the shape?"',
        "mma test --config RECIPE.yaml --model.adapter.path THIS_FOLDER",
        "```",
        "",
        f"Licence: {licence}. The backbones keep their own licences.",
    ]
    return "\n".join(lines) + "\n"


def _backbone_row(part: str, backbone: dict) -> str:
    fingerprint = backbone["fingerprint"]
    return f"| {part} | `{backbone['name']}` | {fingerprint['parameters']:,} | `{fingerprint['values'][:16]}` |"


def _training_lines(training: dict, recipe: str | None) -> list[str]:
    if not training:
        return ["No training record (saved from Python, not exported from a checkpoint)."]
    lines = [f"{training.get('global_step', '?')} optimizer steps (epoch index {training.get('epoch', '?')})."]
    hyper = training.get("hyper_parameters", {})
    lines += [f"Hyper-parameters: `{json.dumps(hyper)}`", ""]
    metrics = training.get("metrics", {})
    if metrics:
        lines += ["| metric (last logged value) | value | at step |", "|---|---|---|"]
        lines += [f"| {name} | {m['value']:.4g} | {m['step']} |" for name, m in metrics.items()]
    else:
        lines.append("No metrics were logged by the run.")
    if recipe:
        lines += ["", "Recipe of the run:", "", "```yaml", recipe.rstrip(), "```"]
    return lines
