"""``padim propose``: which setting for parts that may not be aligned suits a product, from its good images.

No Prefect and no store: :func:`padim.evaluation.proposal.propose_setting` fits every candidate in
this process (imported only when the command runs) and prints each one's probe AUROC and the
``padim train`` options of the proposal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from padim.core.config import PadimConfig
from padim.settings import ProposalSettings, RemedyCandidate, TrainSettings, default_of
from padim_cli.options import (
    Backbone,
    BackboneOpt,
    BatchOpt,
    ChannelsOpt,
    CropOpt,
    Device,
    DeviceOpt,
    HoldoutOpt,
    ImageSizeOpt,
    NoCropOpt,
    RuntimeChoice,
    RuntimeOpt,
    WeightsOpt,
    choice_enum,
)

__all__ = ["CandidateChoice", "proposal_lines", "propose"]

CandidateChoice = choice_enum("CandidateChoice", RemedyCandidate, "A setting padim propose tries.")


def proposal_lines(proposal: object) -> list[str]:
    """Readable lines of a :class:`padim.evaluation.proposal.Proposal`."""
    lines = [
        f"fitted on {proposal.n_fit} good images; probe set: {proposal.n_probe} images "  # type: ignore[attr-defined]
        "(held-out good images and synthetic defective copies of them)",
        f"{'candidate':<14} {'probe AUROC':>11}  {'by defect':<60} {'seconds':>8}",
    ]
    for result in proposal.results:  # type: ignore[attr-defined]
        by_defect = " ".join(f"{kind} {value:.3f}" for kind, value in result.auroc_by_defect.items())
        mark = "  <- proposed" if result.name == proposal.chosen else ""  # type: ignore[attr-defined]
        lines.append(f"{result.name:<14} {result.probe_auroc:>11.4f}  {by_defect:<60} {result.seconds:>8.0f}{mark}")
    flags = proposal.flags or "(no option: plain PaDiM)"  # type: ignore[attr-defined]
    lines.append(f"proposed: {proposal.chosen}; padim train options: {flags}")  # type: ignore[attr-defined]
    for uri, error in proposal.failed:  # type: ignore[attr-defined]
        lines.append(f"skipped unreadable image {uri}: {error}")
    return lines


def propose(
    images: Annotated[str, typer.Argument(metavar="IMAGES", help="Folder or s3:// prefix of good images.")],
    backbone: BackboneOpt = Backbone(default_of(PadimConfig, "backbone")),
    weights: WeightsOpt = None,
    channels: ChannelsOpt = None,
    image_size: ImageSizeOpt = default_of(PadimConfig, "image_size"),
    crop: CropOpt = default_of(PadimConfig, "crop_size"),
    no_crop: NoCropOpt = False,
    batch_size: BatchOpt = default_of(TrainSettings, "batch_size"),
    device: DeviceOpt = Device(default_of(TrainSettings, "device")),
    runtime: RuntimeOpt = RuntimeChoice(default_of(TrainSettings, "runtime")),
    holdout_fraction: HoldoutOpt = default_of(TrainSettings, "holdout_fraction"),
    candidates: Annotated[
        list[CandidateChoice],  # type: ignore[valid-type]
        typer.Option(
            "--candidate",
            help="A setting to try; repeat the option for several (the earlier wins a tie).",
            case_sensitive=False,
        ),
    ] = [CandidateChoice(name) for name in default_of(ProposalSettings, "candidates")],  # noqa: B006 - typer reads it
    defects_per_image: Annotated[
        int,
        typer.Option(
            "--defects-per-image", min=1, max=16, metavar="N", help="Synthetic defective copies of each held-out image."
        ),
    ] = default_of(ProposalSettings, "defects_per_image"),
    json_file: Annotated[
        Path | None,
        typer.Option("--json", metavar="FILE", help="Also write the proposal as JSON.", show_default=False),
    ] = None,
) -> None:
    """Propose the setting for parts that may not be aligned, from a product's good images alone.

    Holds out some good images, paints synthetic defects (scratch, spot, crack, a misplaced patch)
    on copies of them, fits each candidate setting on the other images and keeps the one that
    best separates the held-out images from their defective copies (plain PaDiM on a tie).

    Examples:

    \b
        padim propose ./images/good
        padim propose s3://factory/line3/good --candidate plain --candidate augment4_any --json proposal.json
    """
    from padim_prefect.flows.params import build_config

    from padim.evaluation.proposal import propose_setting
    from padim.io.listing import list_images

    if no_crop and crop is not None:
        raise typer.BadParameter("give either --crop N or --no-crop, not both", param_hint="--crop")
    config = build_config(backbone.value, weights, channels, image_size, crop)
    train_settings = TrainSettings(
        batch_size=batch_size, device=device.value, runtime=runtime.value, holdout_fraction=holdout_fraction
    )
    chosen = tuple(choice.value for choice in candidates)
    settings = ProposalSettings(candidates=chosen, defects_per_image=defects_per_image)
    proposal = propose_setting(list_images(images), config, train_settings, settings)
    for line in proposal_lines(proposal):
        typer.echo(line)
    if json_file is not None:
        json_file.write_text(json.dumps(proposal.to_dict(), indent=1) + "\n", encoding="utf-8")
