"""Embedded synthetic dermoscopy images: a data source that needs no download.

Jin & Li (SASHIMI 2022, arXiv 2207.00762; FedDetect, arXiv 2210.10886) train a
federated GAN on ISIC dermoscopy photographs. This module draws images with the
features of those photographs that matter to a GAN and to the backdoor trigger,
so every experiment, test and benchmark runs offline and bit-reproducibly:

* a skin-toned background with smooth low-frequency colour variation (uneven
  illumination, erythema), mid-scale skin texture and per-pixel grain;
* one irregular pigmented lesion: a rotated ellipse whose radius is modulated
  by a few random Fourier harmonics of the polar angle (plus a smooth noise
  field at the border), filled with brown pigment of varying density and, for
  melanomas, black and blue-grey blotches; its border is a sigmoid of the
  relative signed distance whose width sets a sharp or a soft edge;
* occasional hairs (thin dark curved strokes: circle arcs fading at the ends)
  and dermatoscope optics (illumination fall-off, white balance and, sometimes,
  the black circular corners outside the lens field).

The two classes differ visibly, after the ABCD rule of dermoscopy (Asymmetry,
Border, Colour, Diameter): 0 ``nevus`` is smaller, rounder, uniformly light to
medium brown with a sharp regular border; 1 ``melanoma`` is larger, asymmetric
and irregular, multi-coloured (dark brown, black, blue-grey) with a fuzzier
border.

Randomness is counter-based: every random number is a hash of
``(seed, image index, stream, element)``, so image ``i`` depends only on
``(seed, i, resolution)``: a prefix of a larger draw is the smaller draw. All
but the per-pixel grain is defined in continuous coordinates, so one
``(seed, i)`` shows the same lesion at every resolution. Generation is
vectorised over chunks of images (no Python loop over images; the only loop is
over at most four hair slots per chunk).

The backdoor trigger is pasted at the bottom-right corner; nothing here draws a
periodic or checkerboard-like pattern there (or anywhere), so a trigger metric
calibrated on clean real images is not fooled by the data itself.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 2
CLASS_NAMES = ("nevus", "melanoma")
MIN_RESOLUTION = 32
MAX_RESOLUTION = 256

_F32 = np.float32
_U64 = np.uint64
# Pixels per chunk: 2**19 float32 pixels = 2 MiB per temporary field; a chunk
# needs a few dozen of them, so memory stays bounded (~100 MiB) at any N.
_CHUNK_PIXELS = 1 << 19
_GEMM_ONE_THREAD_MNK = 1 << 18  # see _matmul

# Colours (RGB in [0, 1]) picked by eye from ISIC photographs.
_SKIN_LIGHT = np.array([0.92, 0.77, 0.69], _F32)
_SKIN_DARK = np.array([0.82, 0.59, 0.47], _F32)
_ERYTHEMA = np.array([0.06, -0.06, -0.05], _F32)  # reddening direction
_NEVUS_LIGHT = np.array([0.70, 0.50, 0.36], _F32)
_NEVUS_DARK = np.array([0.45, 0.28, 0.17], _F32)
_DARK_BROWN = np.array([0.27, 0.15, 0.09], _F32)
_BLACK = np.array([0.10, 0.07, 0.07], _F32)
_BLUE_GREY = np.array([0.47, 0.50, 0.57], _F32)
_HAIR = np.array([0.12, 0.09, 0.07], _F32)
_LENS_BLACK = np.array([0.03, 0.025, 0.025], _F32)
_WARM = np.array([0.03, 0.0, -0.05], _F32)  # white-balance shift, per unit
_LUMA = np.array([0.299, 0.587, 0.114], _F32)  # ITU-R BT.601 luma weights

_MAX_HAIRS = 4
_NUM_HARMONICS = 5
_ANGLE_BINS = 1024  # r(theta) lookup table: finer than a 256 px lesion's perimeter

# Smooth noise fields: Gaussian-interpolated random grids of a fixed size in
# normalised coordinates (hence independent of the resolution): (name, grid).
_FIELDS = (
  ("skin_bright", 3),
  ("skin_red", 3),
  ("skin_mid", 12),
  ("fine", 28),
  ("edge", 10),
  ("density", 7),
  ("blotch", 7),
)

# Streams of the counter-based hash (any distinct constants).
_STREAM_PARAMS, _STREAM_GRID, _STREAM_PIXEL = 1, 2, 3


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser: a bijective avalanche hash of uint64 (wrapping)."""
  x = x + _U64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
  return x ^ (x >> _U64(31))


def _unit(h: np.ndarray) -> np.ndarray:
  """uint64 hash -> float32 uniform in [0, 1) (top 24 bits)."""
  return (h >> _U64(40)).astype(_F32) * _F32(2.0**-24)


class _Params:
  """Per-image uniforms in [0, 1), handed out in a fixed order by ``next()``."""

  def __init__(self, keys: np.ndarray, count: int):
    stream = _splitmix64(_U64(_STREAM_PARAMS << 32) + np.arange(count, dtype=_U64))
    self._u = _unit(_splitmix64(keys[:, None] ^ stream[None, :]))
    self._i = 0

  def next(self) -> np.ndarray:
    """The next uniform of every image, ``[n, 1, 1]`` (broadcasts over pixels)."""
    col = self._u[:, self._i]
    self._i += 1
    return col[:, None, None]


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """``np.matmul(a, b)`` split along the output columns into small GEMMs.

  OpenBLAS runs a GEMM with ``M*N*K`` above 2**18 on several threads that
  spin-wait for each other; on a shared 2-core machine such mid-sized batched
  GEMMs were measured at 0.4 ms median but up to 500 ms. Below the threshold
  each GEMM runs on the calling thread only.
  """
  m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
  block = max(1, _GEMM_ONE_THREAD_MNK // (m * k))
  if n <= block:
    return np.matmul(a, b)
  shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (m, n)
  out = np.empty(shape, np.result_type(a, b))
  for start in range(0, n, block):
    out[..., start : start + block] = np.matmul(a, b[..., start : start + block])
  return out


def _interp_matrix(grid: int, resolution: int) -> np.ndarray:
  """Gaussian interpolation ``[R, grid + 4]`` from grid nodes to pixel centres.

  Rows are scaled to unit sum of squares, so a field ``U Z U^T`` of i.i.d.
  unit-variance node values has unit variance at every pixel (no edge fading).
  """
  spacing = 2.0 / grid
  nodes = -1.0 + (np.arange(grid + 4) - 1.5) * spacing
  xs = (np.arange(resolution) + 0.5) / resolution * 2.0 - 1.0
  u = np.exp(-0.5 * ((xs[:, None] - nodes[None, :]) / (0.8 * spacing)) ** 2)
  u /= np.sqrt((u**2).sum(1, keepdims=True))
  # Drop negligible far weights (some would be float32 subnormals).
  u[u < 1e-6] = 0.0
  return u.astype(_F32)


def _smooth_fields(keys: np.ndarray, resolution: int) -> dict[str, np.ndarray]:
  """All ``_FIELDS`` of a chunk: name -> float32 ``[n, R, R]``, about N(0, 1)."""
  out = {}
  for f, (name, grid) in enumerate(_FIELDS):
    g = grid + 4
    cell = np.arange(g * g, dtype=_U64).reshape(g, g)
    salt = _splitmix64(_U64(_STREAM_GRID << 48) + _U64(f << 32) + cell)
    h = _splitmix64(keys[:, None, None] ^ salt[None])
    # Sum of three 21-bit uniforms of one hash (Irwin-Hall): mean 0, variance 1.
    mask = _U64((1 << 21) - 1)
    z = ((h & mask) + ((h >> _U64(21)) & mask) + (h >> _U64(43))).astype(_F32)
    z = z * _F32(2.0**-20) - _F32(3.0 - 2.0**-20)
    u = _interp_matrix(grid, resolution)
    out[name] = _matmul(_matmul(u, z), np.ascontiguousarray(u.T))
  return out


def _pixel_noise(keys: np.ndarray, resolution: int) -> np.ndarray:
  """Per-pixel grain, float32 ``[n, R, R]``, uniform with mean 0, variance 1."""
  r = resolution
  # 32-bit hash (lowbias32) of image key + pixel salt: half the memory traffic
  # of 64-bit arithmetic on the largest integer array this module makes.
  k32 = (_splitmix64(keys ^ _U64(_STREAM_PIXEL)) >> _U64(32)).astype(np.uint32)
  salt = (_splitmix64(np.arange(r * r, dtype=_U64) + _U64(r << 40)) >> _U64(32)).astype(np.uint32)
  x = k32[:, None] + salt[None, :]
  x ^= x >> np.uint32(16)
  x *= np.uint32(0x7FEB352D)
  x ^= x >> np.uint32(15)
  x *= np.uint32(0x846CA68B)
  x ^= x >> np.uint32(16)
  v = (x >> np.uint32(8)).astype(_F32)
  return ((v - _F32(2**23)) * _F32(np.sqrt(12.0) / 2**24)).reshape(-1, r, r)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return _F32(0.5) + _F32(0.5) * np.tanh(_F32(0.5) * x)


def _render_chunk(keys: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Renders the images of ``keys``.

  Args:
    keys: uint64 ``[n]`` per-image keys.
    resolution: R.

  Returns:
    float32 RGB ``[n, 3, R, R]`` on the 0..255 scale (not yet clipped or
    rounded), int32 labels ``[n]``.
  """
  n, r = keys.shape[0], resolution
  p = _Params(keys, 80)
  fields = _smooth_fields(keys, r)
  grain = _pixel_noise(keys, r)
  xs = (np.arange(r, dtype=_F32) + _F32(0.5)) * _F32(2.0 / r) - _F32(1.0)
  x, y = xs[None, None, :], xs[None, :, None]

  one = _F32(1.0)
  mel = p.next() < 0.5  # [n, 1, 1]; True = melanoma
  labels = mel[:, 0, 0].astype(np.int32)

  def pick(lo_nevus: float, hi_nevus: float, lo_mel: float, hi_mel: float) -> np.ndarray:
    """A per-image uniform in a class-dependent range, ``[n, 1, 1]``."""
    lo = np.where(mel, _F32(lo_mel), _F32(lo_nevus))
    hi = np.where(mel, _F32(hi_mel), _F32(hi_nevus))
    return lo + (hi - lo) * p.next()

  def vec(u: np.ndarray) -> np.ndarray:  # [n, 1, 1] -> [n, 1] for colour maths
    return u[:, :, 0]

  # --- Colours per image, [n, 3] each. --------------------------------------
  tone = vec(p.next())
  skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * tone * tone  # most skin is light
  light = _NEVUS_LIGHT + (_NEVUS_DARK - _NEVUS_LIGHT) * vec(pick(0.0, 0.6, 0.6, 1.0))
  dark = _NEVUS_DARK + (_DARK_BROWN - _NEVUS_DARK) * vec(pick(0.0, 0.6, 0.6, 1.0))
  # White balance: brightness and a warm-cool shift (no green or purple casts).
  warm = _F32(2.0) * vec(p.next()) - one
  wb = (_F32(0.94) + _F32(0.1) * vec(p.next())) * (one + warm * _WARM)
  palette = [
    skin,
    np.broadcast_to(_ERYTHEMA, skin.shape),
    light,
    dark,
    np.broadcast_to(_BLACK, skin.shape),
    np.broadcast_to(_BLUE_GREY, skin.shape),
  ]
  colours = np.stack(palette, -1) * (wb * _F32(255.0))[:, :, None]  # [n, 3, J]

  # --- Skin: illumination, erythema, texture, grain. -------------------------
  shade = fields["skin_bright"] * (_F32(0.03) + _F32(0.05) * p.next())
  shade += one
  shade += _F32(0.02) * fields["skin_mid"]
  shade += _F32(0.025) * fields["fine"]
  shade += (_F32(0.008) + _F32(0.012) * p.next()) * grain
  red = np.clip(fields["skin_red"], _F32(0.0), _F32(2.0))
  red *= _F32(0.1) + _F32(0.45) * p.next()

  # --- Lesion geometry: rotated ellipse, harmonic + noisy border. ------------
  cx = pick(-0.12, 0.12, -0.18, 0.18)
  cy = pick(-0.12, 0.12, -0.18, 0.18)
  r0 = pick(0.22, 0.40, 0.34, 0.56)
  sq = np.sqrt(pick(1.0, 1.3, 1.0, 1.5))  # sqrt(aspect ratio)
  rot = _F32(np.pi) * p.next()
  ca, sa = np.cos(rot), np.sin(rot)
  dx, dy = x - cx, y - cy  # [n, 1, R], [n, R, 1]
  u_ = dx * (ca / sq) + dy * (sa / sq)
  v_ = dy * (ca * sq) - dx * (sa * sq)
  theta = np.arctan2(v_, u_)
  u_ *= u_
  v_ *= v_
  u_ += v_
  rho = np.sqrt(u_, out=u_)
  # r(theta) / r0 = 1 + sum_k a_k cos(k theta + phi_k), tabulated per image.
  bins = np.arange(_ANGLE_BINS, dtype=_F32) * _F32(2 * np.pi / _ANGLE_BINS)
  amp = vec(pick(0.02, 0.05, 0.14, 0.28))
  table = np.ones((n, _ANGLE_BINS), _F32)
  for k in range(1, _NUM_HARMONICS + 1):
    a_k = amp * vec(p.next()) / _F32(k**0.7)
    phi = _F32(2 * np.pi) * vec(p.next())
    table += a_k * np.cos(_F32(k) * bins[None, :] + phi)
  theta *= _F32(_ANGLE_BINS / (2 * np.pi))
  theta += _F32(_ANGLE_BINS + 0.5)
  idx = theta.astype(np.int32)
  idx &= _ANGLE_BINS - 1
  idx += (np.arange(n, dtype=np.int32) * _ANGLE_BINS)[:, None, None]
  d = rho * (one / r0)
  d -= np.take(table, idx)
  d -= fields["edge"] * pick(0.01, 0.03, 0.05, 0.10)  # relative signed distance
  mask = _sigmoid(d * (_F32(-1.0) / pick(0.008, 0.02, 0.025, 0.055)))
  depth = np.clip(d * _F32(-1.6), _F32(0.0), one)  # 0 at the border, 1 inside

  # --- Lesion pigment: density, blotches (weights of the palette). -----------
  dens = (depth - _F32(0.5)) * pick(-0.2, 0.5, 0.0, 0.5)  # darker or lighter centre
  dens += _F32(0.45)
  dens += fields["density"] * pick(0.12, 0.25, 0.3, 0.45)
  # Pigment network: the zero set of a mid-scale random field is a web of
  # curved lines (irregular, never periodic); faint in nevi, broken in melanomas.
  net = fields["fine"] * _F32(1.6)
  net *= net
  np.minimum(net, _F32(80.0), out=net)  # exp(-80) > FLT_MIN: no subnormals
  net = np.exp(-net, out=net)
  net *= pick(0.1, 0.3, 0.15, 0.4)
  dens += net
  np.clip(dens, _F32(0.0), one, out=dens)
  inner = np.minimum(depth * _F32(3.0), one)
  blotch = fields["blotch"]
  # Black where the blotch field is high, blue-grey veil where it is low:
  # melanomas only (nevus thresholds are out of reach of an N(0, 1) field).
  t_black = _sigmoid((blotch - pick(9.0, 9.0, 0.0, 1.0)) * _F32(4.0)) * inner
  t_black *= _F32(0.9)
  t_blue = _sigmoid((blotch + pick(9.0, 9.0, 0.6, 2.0)) * _F32(-4.0)) * inner
  t_blue *= _F32(0.5)
  lesion = mask * (_F32(1.0) + _F32(0.05) * grain)
  # Falloff of the dermatoscope's illumination, applied to every weight.
  vcx = _F32(0.1) * p.next() - _F32(0.05)
  vcy = _F32(0.1) * p.next() - _F32(0.05)
  rc2 = (x - vcx) ** 2 + (y - vcy) ** 2
  fall = one - (_F32(0.04) + _F32(0.14) * p.next()) * rc2
  background = (one - mask) * fall
  lesion *= fall
  w = np.empty((n, 6, r, r), _F32)
  np.multiply(background, shade, out=w[:, 0])
  np.multiply(background, red, out=w[:, 1])
  keep = (one - t_black) * (one - t_blue)
  keep *= lesion
  np.multiply(keep, dens, out=w[:, 3])
  np.subtract(keep, w[:, 3], out=w[:, 2])
  t_black *= one - t_blue
  np.multiply(lesion, t_black, out=w[:, 4])
  np.multiply(lesion, t_blue, out=w[:, 5])
  img = _matmul(colours, w.reshape(n, 6, r * r)).reshape(n, 3, r, r)

  # --- Hairs: circle arcs through a random point, fading at the ends. --------
  pix = _F32(2.0 / r)
  hairy = p.next()[:, 0, 0] < 0.3
  n_hairs = 1 + (p.next()[:, 0, 0] * _MAX_HAIRS).astype(np.int32)
  hair_col = (_HAIR * _F32(255.0))[None, :, None, None]
  for h in range(_MAX_HAIRS):
    hp = [p.next()[:, 0, 0] for _ in range(7)]  # drawn for every image: fixed streams
    sel = np.nonzero(hairy & (h < n_hairs))[0]
    if sel.size == 0:
      continue
    hp = [a[sel][:, None, None] for a in hp]
    px, py = hp[0] * _F32(1.8) - _F32(0.9), hp[1] * _F32(1.8) - _F32(0.9)
    ang = hp[2] * _F32(np.pi)
    rad = _F32(1.0) + _F32(4.0) * hp[3]  # curvature radius
    sign = np.where(hp[4] < 0.5, _F32(-1.0), one)
    ccx = px - sign * rad * np.sin(ang)
    ccy = py + sign * rad * np.cos(ang)
    dist = np.sqrt((x - ccx) ** 2 + (y - ccy) ** 2) - rad
    half_w = _F32(0.005) + _F32(0.007) * hp[5]
    # Sub-pixel hairs are widened and dimmed: same darkness per unit length.
    vis_w = np.maximum(half_w, _F32(0.45) * pix)
    length = _F32(0.5) + _F32(1.0) * hp[6]
    along = ((x - px) ** 2 + (y - py) ** 2) * (one / (length * length))
    alpha = np.exp(np.maximum(-((dist / vis_w) ** 2) - along * along, _F32(-80.0)))
    alpha *= _F32(0.85) * half_w / vis_w
    sub = img[sel]
    img[sel] = sub + (hair_col - sub) * alpha[:, None]

  # --- Dermatoscope lens: black circular corners on some images. -------------
  lens = np.nonzero(p.next()[:, 0, 0] < 0.35)[0]
  lens_r = _F32(1.0) + _F32(0.3) * p.next()
  lens_w = _F32(0.01) + _F32(0.04) * p.next()
  if lens.size:
    black = (_LENS_BLACK * _F32(255.0))[None, :, None, None]
    m = _sigmoid((np.sqrt(rc2[lens]) - lens_r[lens]) / lens_w[lens])
    sub = img[lens]
    img[lens] = sub + (black - sub) * m[:, None]
  return img, labels


def _check_int(name: str, value: object) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
  return int(value)


def make_synthetic(num_images: int, resolution: int, seed: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """Draws synthetic dermoscopy images with nevus / melanoma labels.

  Image ``i`` depends only on ``(seed, i, resolution)``: the first ``k`` images
  of ``make_synthetic(n, ...)`` equal ``make_synthetic(k, ...)``, and the same
  ``(seed, i)`` shows the same lesion at every resolution (only the pixel grain
  differs). Each image is a melanoma with probability 1/2.

  Args:
    num_images: number of images, > 0.
    resolution: image height and width in pixels, in
      ``[MIN_RESOLUTION, MAX_RESOLUTION]`` = [32, 256].
    seed: any int; the same seed gives identical bytes.
    channels: 3 for RGB, 1 for grayscale (the luminance of the RGB image).

  Returns:
    ``(images, labels)``: uint8 ``[num_images, resolution, resolution,
    channels]`` and int32 ``[num_images]`` with values in ``{0, 1}`` indexing
    ``CLASS_NAMES``.

  Raises:
    ValueError: if ``num_images``, ``resolution`` or ``channels`` is out of range.
    TypeError: if one of the arguments is not an int.
  """
  num_images = _check_int("num_images", num_images)
  resolution = _check_int("resolution", resolution)
  channels = _check_int("channels", channels)
  seed = _check_int("seed", seed)
  if num_images <= 0:
    raise ValueError(f"num_images must be > 0, got {num_images}.")
  if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
    raise ValueError(
      f"resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] for the "
      f"synthetic dermoscopy source, got {resolution}."
    )
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")

  seed_key = _splitmix64(np.array([seed & ((1 << 64) - 1)], _U64))[0]
  images = np.empty((num_images, resolution, resolution, channels), np.uint8)
  labels = np.empty(num_images, np.int32)
  chunk = max(1, _CHUNK_PIXELS // (resolution * resolution))
  for start in range(0, num_images, chunk):
    stop = min(start + chunk, num_images)
    keys = _splitmix64(seed_key ^ _splitmix64(np.arange(start, stop, dtype=_U64)))
    img, labels[start:stop] = _render_chunk(keys, resolution)
    np.clip(img, _F32(0.0), _F32(255.0), out=img)
    if channels == 1:
      img = img[:, 0:1] * _LUMA[0] + img[:, 1:2] * _LUMA[1] + img[:, 2:3] * _LUMA[2]
    img += _F32(0.5)  # round to nearest in the cast below
    images[start:stop] = np.moveaxis(img, 1, -1)  # casts to uint8 (truncates)
  return images, labels
