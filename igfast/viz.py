"""Pictures of attributions: image heatmaps and overlays (PNG, with matplotlib), and
token highlighting (HTML, no dependency).

Colours are diverging and centred at zero (red: the feature raised the target
output, blue: lowered it), scaled per picture to the largest magnitude, so that
white always means "no effect".

    from igfast import viz
    viz.save_image_attributions(images, attributions, "attributions.png")
    viz.save_token_html([(tokens, scores, "caption")], "tokens.html")
    viz.save_token_attribution_map(llm_result, "tokens.png")   # or .html
"""

import html
import os
from typing import Optional, Sequence, Tuple

import torch

INSTALL_HINT = "pip install matplotlib (or the extra: pip install 'igfast[viz]')"
COLOR_MAP = "RdBu_r"  # diverging: blue < 0 < red, white at zero


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(f"igfast.viz needs matplotlib for images: {INSTALL_HINT}") from error
    return plt


def _as_2d(values: torch.Tensor, name: str) -> torch.Tensor:
    """(H, W) from (H, W) or (C, H, W): channels are summed (attributions) or
    averaged (images, via the caller)."""
    values = values.detach().to("cpu", torch.float64)
    if values.dim() == 3:
        values = values.sum(0)
    if values.dim() != 2:
        raise ValueError(f"`{name}` must be (H, W) or (C, H, W); got shape {tuple(values.shape)}.")
    return values


def symmetric_limit(values: torch.Tensor) -> float:
    """The colour scale's half-range: the largest magnitude (1 for all zeros)."""
    limit = float(values.abs().max()) if values.numel() else 0.0
    return limit if limit > 0 else 1.0


def image_heatmap(attribution: torch.Tensor, ax=None, title: Optional[str] = None):
    """Draw one attribution map, channels summed, on a diverging scale centred at zero."""
    plt = _pyplot()
    values = _as_2d(attribution, "attribution")
    ax = ax or plt.gca()
    limit = symmetric_limit(values)
    artist = ax.imshow(values.numpy(), cmap=COLOR_MAP, vmin=-limit, vmax=limit)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return artist


def _grey(image: torch.Tensor) -> torch.Tensor:
    image = image.detach().to("cpu", torch.float64)
    if image.dim() == 3:
        image = image.mean(0)
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else torch.zeros_like(image)


def image_overlay(image: torch.Tensor, attribution: torch.Tensor, ax=None,
                  title: Optional[str] = None, opacity: float = 0.85):
    """The image in grey with the attribution colours on top, each pixel as opaque
    as its attribution is strong: features without effect show the image itself."""
    plt = _pyplot()
    ax = ax or plt.gca()
    values = _as_2d(attribution, "attribution")
    limit = symmetric_limit(values)
    colours = plt.get_cmap(COLOR_MAP)((values / (2 * limit) + 0.5).clamp(0, 1).numpy())
    colours[..., 3] = opacity * (values.abs() / limit).numpy()
    ax.imshow(_grey(image).numpy(), cmap="gray")
    artist = ax.imshow(colours)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return artist


def save_image_attributions(
    images: torch.Tensor,
    attributions: torch.Tensor,
    path: str,
    titles: Optional[Sequence[str]] = None,
    dpi: int = 110,
) -> str:
    """One row per image: the input, the attribution heatmap, the overlay. Returns path."""
    plt = _pyplot()
    if images.shape[0] != attributions.shape[0]:
        raise ValueError(
            f"`images` and `attributions` must have the same number of rows; got "
            f"{images.shape[0]} and {attributions.shape[0]}."
        )
    rows = images.shape[0]
    figure, axes = plt.subplots(rows, 3, figsize=(6.0, 2.0 * rows), squeeze=False)
    for row in range(rows):
        label = titles[row] if titles else f"example {row}"
        axes[row][0].imshow(_grey(images[row]).numpy(), cmap="gray")
        axes[row][0].set_axis_off()
        axes[row][0].set_title(label, fontsize=9)
        artist = image_heatmap(attributions[row], axes[row][1], "attribution")
        image_overlay(images[row], attributions[row], axes[row][2], "overlay")
        figure.colorbar(artist, ax=axes[row][1], fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def _token_colour(score: float, limit: float) -> str:
    """Red for positive, blue for negative, white at zero (no matplotlib needed)."""
    strength = max(-1.0, min(1.0, score / limit))
    fade = int(round(255 * (1 - abs(strength))))
    return f"rgb(255,{fade},{fade})" if strength >= 0 else f"rgb({fade},{fade},255)"


def tokens_to_html(tokens: Sequence[str], scores: Sequence[float], caption: str = "") -> str:
    """One sentence as HTML spans coloured by score; hovering shows the value."""
    values = [float(s) for s in scores]
    if len(values) != len(tokens):
        raise ValueError(f"`scores` must have one value per token; got {len(values)} for {len(tokens)}.")
    limit = max((abs(v) for v in values), default=0.0) or 1.0
    spans = "".join(
        f'<span title="{value:+.4f}" style="background:{_token_colour(value, limit)};'
        f'padding:2px 3px;margin:1px;border-radius:3px">{html.escape(token)}</span>'
        for token, value in zip(tokens, values)
    )
    heading = f"<p><b>{html.escape(caption)}</b></p>" if caption else ""
    return f'<div style="font-family:monospace;line-height:2.2">{heading}{spans}</div>'


def save_token_html(rows: Sequence[Tuple[Sequence[str], Sequence[float], str]], path: str,
                    title: str = "igfast token attributions") -> str:
    """Write sentences (tokens, scores, caption) as one HTML page. Returns path."""
    body = "\n".join(tokens_to_html(tokens, scores, caption) for tokens, scores, caption in rows)
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"</head><body><h3>{html.escape(title)}</h3>\n<p>red: raises the output, blue: lowers it, "
        f"white: no effect (hover for values)</p>\n{body}\n</body></html>\n"
    )
    with open(os.fspath(path), "w", encoding="utf-8") as handle:
        handle.write(page)
    return path


def token_labels(tokens: Sequence[str]) -> list:
    """Tokens as a reader sees them: the word-start markers of byte-level BPE ("Ġ")
    and SentencePiece ("▁") become a space, the newline marker "Ċ" becomes "\\n"."""
    return [t.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\\n") for t in tokens]


def token_attribution_map(input_tokens: Sequence[str], output_tokens: Sequence[str], token_attr: torch.Tensor,
                          title: Optional[str] = None):
    """The output-token x input-token map of an LLM attribution (matplotlib), as
    Captum's ``LLMAttributionResult.plot_token_attr`` draws it: one row per output
    token, one column per input token, values written in the cells. Returns
    (figure, axes)."""
    plt = _pyplot()
    values = token_attr.detach().to("cpu", torch.float64)
    if values.shape != (len(output_tokens), len(input_tokens)):
        raise ValueError(f"`token_attr` must be ({len(output_tokens)}, {len(input_tokens)}); "
                         f"got {tuple(values.shape)}.")
    limit = symmetric_limit(values)
    figure, axes = plt.subplots(figsize=(max(4.0, 0.55 * len(input_tokens) + 2),
                                         max(2.5, 0.4 * len(output_tokens) + 1.5)))
    artist = axes.imshow(values.numpy(), cmap=COLOR_MAP, vmin=-limit, vmax=limit, aspect="auto")
    figure.colorbar(artist, ax=axes, fraction=0.03, pad=0.02)
    axes.set_xticks(range(len(input_tokens)), labels=token_labels(input_tokens), rotation=60, ha="right",
                    fontsize=8)
    axes.set_yticks(range(len(output_tokens)), labels=token_labels(output_tokens), fontsize=8)
    axes.set_xlabel("prompt tokens")
    axes.set_ylabel("output tokens")
    if values.numel() <= 600:
        for (row, column), value in zip(torch.cartesian_prod(torch.arange(values.shape[0]),
                                                             torch.arange(values.shape[1])).tolist(),
                                        values.reshape(-1).tolist()):
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                      color="white" if abs(value) > 0.6 * limit else "black")
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure, axes


def sequence_attribution_bars(input_tokens: Sequence[str], seq_attr: torch.Tensor):
    """Bars of the attribution of the whole output to each input token. Returns (figure, axes)."""
    plt = _pyplot()
    values = seq_attr.detach().to("cpu", torch.float64).reshape(-1)
    limit = symmetric_limit(values)
    figure, axes = plt.subplots(figsize=(max(4.0, 0.5 * len(input_tokens) + 1.5), 3.0))
    colours = plt.get_cmap(COLOR_MAP)((values / (2 * limit) + 0.5).clamp(0, 1).numpy())
    axes.bar(range(len(values)), values.numpy(), color=colours, edgecolor="grey", linewidth=0.5)
    axes.set_xticks(range(len(input_tokens)), labels=token_labels(input_tokens), rotation=60, ha="right",
                    fontsize=8)
    axes.axhline(0, color="grey", linewidth=0.5)
    figure.tight_layout()
    return figure, axes


def save_token_attribution_map(result, path: str, title: Optional[str] = None, dpi: int = 120) -> str:
    """Write an LLM attribution result's token map as a PNG (``.png``) or as an HTML
    table (``.html``, no matplotlib needed). Returns path."""
    if result.token_attr is None:
        raise ValueError("the result has no token_attr to draw")
    if os.fspath(path).endswith(".html"):
        with open(os.fspath(path), "w", encoding="utf-8") as handle:
            handle.write(token_map_html(result.input_tokens, result.output_tokens, result.token_attr,
                                        title or "igfast LLM attribution"))
        return path
    plt = _pyplot()
    figure, _ = token_attribution_map(result.input_tokens, result.output_tokens, result.token_attr, title)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def token_map_html(input_tokens: Sequence[str], output_tokens: Sequence[str], token_attr: torch.Tensor,
                   title: str = "igfast LLM attribution") -> str:
    """The output-token x input-token map as an HTML page: a table of coloured cells
    (red raises the output token's log-probability, blue lowers it; hover for values)."""
    values = token_attr.detach().to("cpu", torch.float64)
    limit = symmetric_limit(values)
    header = "".join(f"<th style='writing-mode:vertical-rl;font-weight:normal'>{html.escape(t)}</th>"
                     for t in token_labels(input_tokens))
    rows = []
    for output_token, row in zip(output_tokens, values.tolist()):
        cells = "".join(f"<td title='{v:+.4f}' style='background:{_token_colour(v, limit)};min-width:1.6em'></td>"
                        for v in row)
        rows.append(f"<tr><th style='text-align:right'>{html.escape(output_token)}</th>{cells}</tr>")
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:monospace'><h3>{html.escape(title)}</h3>"
        "<p>rows: output tokens; columns: prompt tokens; red raises the output token's "
        "log-probability, blue lowers it (hover for values)</p>"
        f"<table style='border-collapse:collapse'><tr><th></th>{header}</tr>{''.join(rows)}</table>"
        "</body></html>\n"
    )
