"""Prompt templates for zero-shot classification; '{}' is replaced by a class name."""

# For the embedded demo dataset: plain descriptions in the style of its captions.
DEMO = (
    "a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a drawing of a {}.",
)

# A short general-purpose set (CLIP's paper uses this ensemble style; see issue 4 for the full 80).
SHORT = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "itap of a {}.",
    "art of the {}.",
)

TEMPLATE_SETS = {"demo": DEMO, "short": SHORT}


def get_templates(name: str) -> tuple[str, ...]:
  if name not in TEMPLATE_SETS:
    raise ValueError(f"Unknown template set {name!r}; known: {sorted(TEMPLATE_SETS)}.")
  return TEMPLATE_SETS[name]
