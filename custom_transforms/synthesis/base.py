"""Bases of every anomaly-synthesis method: an array transform and its dictionary wrapper.

A method is a pure function ``(image (H, W), lung (H, W), rng) -> (synthetic, mask)`` plus a few lines: a
subclass of :class:`AnomalySynthesis` that calls it in :meth:`~AnomalySynthesis.synthesize`, and a subclass
of :class:`AnomalySynthesisd` that builds one. The bases own everything else, as MONAI's
``RandGaussianNoise`` / ``RandGaussianNoised`` pair does:

- **randomness**: the array transform draws all of it in :meth:`~AnomalySynthesis.randomize` (whether to
  synthesise, and the seed of the ``numpy.random.Generator`` handed to the pure function); the
  dictionary transform draws its own ``prob`` and forwards ``set_random_state`` to the array transform, so
  the same seed gives the same output;
- **containers**: numpy in, numpy out; tensor in, tensor on the same device; ``MetaTensor`` in,
  ``MetaTensor`` carrying the image's metadata (``custom_transforms.utils``);
- **keys** (docs/architecture.md): reads ``image`` and ``lung``, writes ``synthetic`` and ``mask``,
  honours ``allow_missing_keys``;
- **clean samples**: with probability ``1 - prob``, or when the lung map is empty and
  ``on_empty_lung="clean"``, ``synthetic`` is a copy of the image and ``mask`` is all zeros;
- **a second image** for methods that take their patch from another training image (NSA, FPI:
  ``needs_source = True``): a :class:`SourcePool` of the training files, loaded on demand by the same
  loading and intensity transforms as the images. The array transform draws the pool index in
  ``randomize()`` with the rest of its randomness, so seeding, ``SeededPerSampled`` validation sets, loader
  workers and DDP ranks need nothing else; a ``source`` given in the call (or the dictionary's
  ``source_key``) takes precedence. :class:`SourceSynthesis` / :class:`SourceSynthesisd` are the bases of
  these methods;
- **parameters**: a method's parameters are a frozen dataclass (``params_class``, e.g. ``FPIParams``);
  ``params`` and keyword overrides of single fields, checked by name (:func:`resolve_params`), give
  ``self.params``, and the dictionary transform resolves them before building its array transform, so its
  errors name the transform the user called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends

from custom_transforms.utils import Choice, as_2d, like, source_name

__all__ = ["ON_EMPTY_LUNG", "AnomalySynthesis", "AnomalySynthesisd", "SourcePool", "SourceSynthesis",
           "SourceSynthesisd", "check_lung_values", "check_param_names", "check_source_inputs",
           "resolve_params", "validate_on_empty_lung", "validate_prob"]

ON_EMPTY_LUNG = ("clean", "raise")


validate_on_empty_lung = Choice("on_empty_lung", ON_EMPTY_LUNG)


def validate_prob(prob: float, name: str = "synthesis_prob") -> float:
    """Check a probability.

    Raises:
        ValueError: ``prob`` is not a number in [0, 1]; the message names the config key ``name``.
    """
    try:
        p = float(prob)
    except (TypeError, ValueError):
        raise ValueError(f"prob ({name}) must be a number in [0, 1], got {prob!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"prob ({name}) must be in [0, 1], got {prob!r}")
    return p


def check_param_names(names, params_class: type, owner: str, list_fields: bool = False) -> None:
    """Check that every name in ``names`` is a field of the dataclass ``params_class``.

    Raises:
        TypeError: an unknown name; the message names ``owner`` (the function or transform given it) and,
            with ``list_fields``, the valid names.
    """
    fields = [f.name for f in dataclasses.fields(params_class)]
    unknown = sorted(set(names) - set(fields))
    if unknown:
        valid = f" ({', '.join(fields)})" if list_fields else ""
        raise TypeError(f"{owner} got unknown parameter(s) {unknown}; valid names are the fields of "
                        f"{params_class.__name__}{valid}")


def resolve_params(params_class: type, params, overrides: Mapping, owner: str, list_fields: bool = False):
    """``params`` (default: ``params_class()``, the published values) with single fields replaced by ``overrides``.

    Raises:
        TypeError: ``params`` is not a ``params_class``, or an override is not one of its fields
            (:func:`check_param_names`); the message names ``owner``.
        ValueError: a replaced field is invalid (the dataclass's own checks).
    """
    name = params_class.__name__
    if params is not None and not isinstance(params, params_class):
        article = "an" if name[:1].upper() in "AEFHILMNORSX" else "a"  # as read aloud: "an FPIParams"
        raise TypeError(f"{owner}: params must be {article} {name}, got {type(params).__name__}")
    check_param_names(overrides, params_class, owner, list_fields)
    p = params or params_class()
    return dataclasses.replace(p, **overrides) if overrides else p


def check_lung_values(lung: np.ndarray) -> None:
    """Check lung labels: 0 (background), 1 (right lung) or 2 (left lung); bool maps pass.

    Raises:
        ValueError: a value outside 0..2.
    """
    if lung.size and (lung.min() < 0 or lung.max() > 2):
        raise ValueError(f"lung labels must be 0 (background), 1 (right lung) or 2 (left lung); "
                         f"got values in [{lung.min()}, {lung.max()}]")


def check_source_inputs(image, lung, source, min_side: int, missing_source: str):
    """The inputs of a pure function that takes a second image: ``(image, lung, source)`` numpy ``(H, W)``.

    The arrays keep their dtypes (bool lungs become uint8); conversion and clipping are the method's.

    Raises:
        ValueError: ``image`` not 2-D or under ``min_side`` px a side, ``lung`` or ``source`` of another shape,
            bad lung labels, or no ``source`` (the message ``missing_source``).
    """
    image, lung = np.asarray(image), np.asarray(lung)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    if min(image.shape) < min_side:
        raise ValueError(f"image too small for synthesis: {image.shape} (at least {min_side} px a side)")
    if lung.shape != image.shape:
        raise ValueError(f"lung label map shape {lung.shape} does not match image shape {image.shape}")
    if source is None:
        raise ValueError(missing_source)
    source = np.asarray(source)
    if source.shape != image.shape:
        raise ValueError(f"source image shape {source.shape} does not match image shape {image.shape} "
                         f"(load both at the same image_size)")
    if lung.dtype == bool:
        lung = lung.astype(np.uint8)
    check_lung_values(lung)
    return image, lung, source


def lung_labels(lung, image_shape: tuple, name: str = "lung") -> np.ndarray:
    """A ``(1, H, W)`` or ``(H, W)`` lung label map as ``uint8 (H, W)`` matching ``image_shape``.

    Raises:
        ValueError: the map is not one 2-D image or its shape differs from the image's.
    """
    lab = as_2d(lung, name)
    if lab.shape != tuple(image_shape):
        raise ValueError(f"'{name}' shape {lab.shape} does not match the image shape {tuple(image_shape)}")
    return np.rint(lab).astype(np.uint8) if lab.dtype.kind == "f" else lab.astype(np.uint8)


class SourcePool:
    """Training images a method can take a second ("source") image from, loaded on demand.

    Args:
        data: the training data dicts (``{"image": path, ...}``, as :mod:`scripts.data.datasets` makes them)
            or paths.
        loader: dict -> dict transform that loads ``key`` (e.g. ``Compose(load_transforms + intensity_transforms)``
            of the configs, so the source looks like the image it is pasted into); default
            :class:`~custom_transforms.io.LoadCXRd` at 256 px.
        key: the image key of the data dicts.
        cache: keep each loaded image in memory (per process: each loader worker has its own copy), so a file
            is read once instead of once per draw; worth it for small images (SAGAN's 64 px unlabelled pool).

    Raises:
        ValueError: ``data`` is empty.
    """

    def __init__(self, data: Sequence, loader: Callable | None = None, key: str = "image", cache: bool = False):
        self.items = [dict(d) if isinstance(d, Mapping) else {key: d} for d in data]
        if not self.items:
            raise ValueError("SourcePool needs at least one image (the training split is empty)")
        if loader is None:
            from custom_transforms.io import LoadCXRd

            loader = LoadCXRd(key)
        self.loader, self.key = loader, key
        self._cache: dict[int, object] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, exclude: str = ""):
        """Image ``index`` (``(1, H, W)``); the next one when its file is ``exclude`` (the target image)."""
        i = index % len(self.items)
        if exclude and len(self.items) > 1 and str(self.items[i][self.key]) == exclude:
            i = (i + 1) % len(self.items)
        if self._cache is None:
            return self.loader(dict(self.items[i]))[self.key]
        if i not in self._cache:
            self._cache[i] = self.loader(dict(self.items[i]))[self.key]
        return self._cache[i]


class AnomalySynthesis(RandomizableTransform):
    """Array synthesis: ``(image (1, H, W), lung (1, H, W)) -> (synthetic, mask)``, each ``(1, H, W)`` float32.

    Subclasses implement :meth:`synthesize` by calling their pure function with the generator given; a
    method that needs a second image sets ``needs_source = True`` and receives it as ``source``; a method
    that does not place its anomaly by the lungs sets ``needs_lung = False`` (class or instance attribute).
    ``params_class`` is the method's parameter dataclass; :meth:`_set_params` sets ``self.params`` from
    ``params`` and keyword overrides (``list_param_names``: name the valid fields in the error on an unknown
    one).

    Args:
        prob: probability of synthesising; otherwise the sample is clean.
        on_empty_lung: ``"clean"`` (an empty lung map gives a clean sample) or ``"raise"`` (the pure
            function raises ``ValueError``).
        source_pool: a :class:`SourcePool` for methods with ``needs_source``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    needs_source = False  # True: the method pastes from a second image (``source``)
    needs_lung = True  # False: the method ignores the lungs, so an empty lung map does not make a clean sample
    params_class: type | None = None  # the method's parameter dataclass (``self.params``)
    list_param_names = False  # True: an unknown parameter's error lists the valid names

    def __init__(self, prob: float = 1.0, on_empty_lung: str = "clean", source_pool: SourcePool | None = None):
        RandomizableTransform.__init__(self, validate_prob(prob))
        self.on_empty_lung = validate_on_empty_lung(on_empty_lung)
        self.source_pool = source_pool
        self._seed, self._source_index = 0, 0

    def _set_params(self, params, overrides: Mapping) -> None:
        """``self.params``: ``params`` (default: the published values) with the ``overrides`` fields replaced."""
        self.params = resolve_params(self.params_class, params, overrides, type(self).__name__,
                                     self.list_param_names)

    def randomize(self, data=None) -> None:
        """Draw whether to synthesise, the seed of this call's generator and the source index (all always drawn)."""
        super().randomize(None)
        self._seed = int(self.R.randint(2**31))
        if self.needs_source and self.source_pool is not None:
            self._source_index = int(self.R.randint(len(self.source_pool)))

    def synthesize(self, image: np.ndarray, lung: np.ndarray, rng: np.random.Generator, source=None):
        """``(synthetic, mask)`` float32 ``(H, W)`` for a float32 image in [0, 1] and uint8 lung labels."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _source(self, img, source, shape) -> np.ndarray:
        """The second image as float32 ``(H, W)``: ``source`` when given, else drawn from the pool."""
        if source is None:
            if self.source_pool is None:
                raise ValueError(f"{type(self).__name__} takes its patch from a second image: give a source_pool "
                                 f"(the training images) or a source image")
            source = self.source_pool.load(self._source_index, exclude=source_name(img))
        src = as_2d(source, "source").astype(np.float32)
        if src.shape != tuple(shape):
            raise ValueError(f"source image shape {src.shape} does not match the image shape {tuple(shape)} "
                             f"(load both at the same image_size)")
        return src

    def __call__(self, img, lung, source=None, randomize: bool = True):
        if randomize:
            self.randomize()
        image = as_2d(img, "image").astype(np.float32)
        labels = lung_labels(lung, image.shape)
        synthetic = mask = None
        if self._do_transform and (not self.needs_lung or (labels > 0).any() or self.on_empty_lung == "raise"):
            extra = {"source": self._source(img, source, image.shape)} if self.needs_source else {}
            synthetic, mask = self.synthesize(image, labels, np.random.default_rng(self._seed), **extra)
        if synthetic is None:
            return self.clean(img)
        return like(synthetic, img, dtype=np.float32), like(mask, img, dtype=np.float32)

    @staticmethod
    def clean(img):
        """A clean sample: ``(copy of the image, all-zero mask)`` as float32 in the image's container."""
        image = as_2d(img, "image").astype(np.float32)
        return like(image, img, dtype=np.float32), like(np.zeros(image.shape, np.float32), img, dtype=np.float32)


class AnomalySynthesisd(RandomizableTransform, MapTransform):
    """Dictionary synthesis: ``d[synthetic_key], d[mask_key] = synthesizer(d[key], d[lung_key])``.

    Args:
        keys: the one image key.
        synthesizer: the array transform (an :class:`AnomalySynthesis`, built with ``prob=1``).
        lung_key / synthetic_key / mask_key: the other keys of the contract.
        prob: probability of synthesising (``synthesis_prob`` in the configs); otherwise a clean sample.
        allow_missing_keys: skip (leave the dictionary unchanged) when the image or lung key is missing.
        source_key: for methods that need a second image, a key holding it (used when present; otherwise
            the synthesizer's source pool).
    """

    backend = AnomalySynthesis.backend

    def __init__(self, keys: KeysCollection, synthesizer: AnomalySynthesis, lung_key: str = "lung",
                 synthetic_key: str = "synthetic", mask_key: str = "mask", prob: float = 1.0,
                 allow_missing_keys: bool = False, source_key: str | None = None):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, validate_prob(prob))
        if len(self.keys) != 1:
            raise ValueError(f"{type(self).__name__} takes exactly one image key, got {self.keys}")
        self.synthesizer = synthesizer
        self.lung_key, self.synthetic_key, self.mask_key = lung_key, synthetic_key, mask_key
        self.source_key = source_key

    @classmethod
    def make_synthesizer(cls, synth_class: type[AnomalySynthesis], params, overrides: Mapping,
                         **kwargs) -> AnomalySynthesis:
        """``synth_class(params=..., **kwargs)``, its ``params`` resolved here against the keyword ``overrides``
        (so that a bad parameter's error names this dictionary transform)."""
        params = resolve_params(synth_class.params_class, params, overrides, cls.__name__,
                                synth_class.list_param_names)
        return synth_class(params=params, **kwargs)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.synthesizer.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.lung_key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"{type(self).__name__}: key '{self.lung_key}' (lung labels) is missing from the "
                               f"data dictionary (keys: {list(d)})")
            self.randomize(None)
            self.synthesizer.randomize()  # always drawn: the random stream does not depend on the prob outcome
            if not self._do_transform:
                d[self.synthetic_key], d[self.mask_key] = self.synthesizer.clean(d[key])
                continue
            source = d.get(self.source_key) if self.source_key else None
            d[self.synthetic_key], d[self.mask_key] = self.synthesizer(d[key], d[self.lung_key], source=source,
                                                                       randomize=False)
        return d


class SourceSynthesis(AnomalySynthesis):
    """Array base of the methods that take their patch from a second training image (NSA, FPI).

    The second image is the ``source`` given in the call, else one drawn from ``source_pool`` (its index is
    drawn in ``randomize()``). The lungs matter only with the parameter ``restrict_to_lung=True``
    (``needs_lung``), so an empty lung map does not make a clean sample otherwise. A subclass sets
    ``params_class`` (a dataclass with a ``restrict_to_lung`` field) and implements :meth:`synthesize`.

    Args:
        params: a ``params_class`` instance; keyword ``**kwargs`` (its field names) replace single fields.
        prob / on_empty_lung / source_pool: see :class:`AnomalySynthesis`.
    """

    needs_source = True
    list_param_names = True

    def __init__(self, params=None, prob: float = 1.0, on_empty_lung: str = "clean",
                 source_pool: SourcePool | None = None, **kwargs):
        super().__init__(prob, on_empty_lung, source_pool)
        self._set_params(params, kwargs)
        self.needs_lung = self.params.restrict_to_lung


class SourceSynthesisd(AnomalySynthesisd):
    """Dictionary base of the methods with a second image: holds a ``synthesizer_class`` (a :class:`SourceSynthesis`).

    Reads ``d[key]`` (``(1, H, W)`` image in [0, 1]), ``d[lung_key]`` (``(1, H, W)`` labels) and, when
    ``source_key`` is set and present, ``d[source_key]`` (the second image; otherwise one from
    ``source_pool``); writes ``d[synthetic_key]`` and ``d[mask_key]`` (``(1, H, W)`` float32) in the image's
    container. With probability ``1 - prob`` the sample is clean. ``set_random_state(seed)`` reproduces
    results exactly, the pool image included (forwarded to the array transform it holds). Other arguments as
    the array transform.
    """

    synthesizer_class: type[SourceSynthesis] = SourceSynthesis

    def __init__(self, keys: KeysCollection = ("image",), lung_key: str = "lung", synthetic_key: str = "synthetic",
                 mask_key: str = "mask", prob: float = 1.0, on_empty_lung: str = "clean",
                 source_pool: SourcePool | None = None, source_key: str | None = None,
                 allow_missing_keys: bool = False, params=None, **kwargs):
        synth = self.make_synthesizer(self.synthesizer_class, params, kwargs, on_empty_lung=on_empty_lung,
                                      source_pool=source_pool)
        super().__init__(keys, synth, lung_key, synthetic_key, mask_key, prob, allow_missing_keys,
                         source_key=source_key)
