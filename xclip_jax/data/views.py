"""What a method asks of the input pipeline: its image and text views, declared by name.

A method lists the views its objective reads; the host pipeline makes exactly those (crops and
captions need the encoded bytes), the train step augments them on the device (colour, blur,
flip, normalisation are arithmetic), and the synthetic source fakes the same keys. Nothing else
in the pipeline depends on which method is trained, so a new method declares its views here
instead of editing the pipeline.

  ImageView.crop     "clip": a light RandomResizedCrop with config.data.crop_scale
                     "ssl":  a self-supervised view's crop with config.data.view_crop_scale
  ImageView.augment  "clip": flip (if enabled) and normalisation only
                     "moco": MoCo v2's colour jitter, grayscale, Gaussian blur, flip, normalisation
                             (probabilities and strengths from config.data)
  ImageView.flip     None: config.data.flip decides; True/False: this view always/never flips
  TextView.eda       False: the caption as sampled; True: the same caption after one EDA op
"""

from __future__ import annotations

import dataclasses

CROPS = ("clip", "ssl")
AUGMENTS = ("clip", "moco")


@dataclasses.dataclass(frozen=True)
class ImageView:
  key: str                       # the batch key: "image", "image2", ...
  crop: str = "clip"
  augment: str = "clip"
  flip: bool | None = None

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f"ImageView {self.key!r}: crop={self.crop!r} is not one of {CROPS}.")
    if self.augment not in AUGMENTS:
      raise ValueError(f"ImageView {self.key!r}: augment={self.augment!r} is not one of "
                       f"{AUGMENTS}.")

  def flips(self, data_config) -> bool:
    """Whether this view is randomly mirrored, given config.data."""
    return bool(data_config.flip) if self.flip is None else self.flip

  def crop_scale(self, data_config) -> tuple[float, float]:
    """The RandomResizedCrop area range of this view's crop kind, given config.data."""
    field = "crop_scale" if self.crop == "clip" else "view_crop_scale"
    return tuple(float(s) for s in data_config[field])


@dataclasses.dataclass(frozen=True)
class TextView:
  key: str                       # the batch key: "text", "text_aug"
  eda: bool = False


@dataclasses.dataclass(frozen=True)
class Views:
  """Every view a method's objective reads; keys are unique across image and text views."""
  image: tuple[ImageView, ...]
  text: tuple[TextView, ...]

  def __post_init__(self):
    keys = [v.key for v in self.image] + [v.key for v in self.text]
    if len(set(keys)) != len(keys):
      raise ValueError(f"Duplicate view keys in {keys}.")
    if not self.image or not self.text:
      raise ValueError("A method needs at least one image view and one text view.")

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(v.key for v in self.image) + tuple(v.key for v in self.text)

  @property
  def needs_eda(self) -> bool:
    return any(v.eda for v in self.text)


# The one-view pair most methods train on: a lightly cropped image and its caption.
SINGLE = Views(image=(ImageView("image"),), text=(TextView("text"),))
