"""Image files: checking them up front, and decoding them to one size and channel count.

`decode` is the one decoder every file-based source uses (folder, TFRecord, TFDS):
JPEG, PNG, WebP, BMP and GIF (first frame) bytes -> uint8 [H, W, C], resized by
`--resize`:

  crop     scale the short side to fit, centre-crop the rest (Keras' crop_to_aspect_ratio)
  pad      scale the long side to fit, pad the rest with black
  stretch  scale each side on its own

Everything decodes to RGB first (TensorFlow's GIF and BMP decoders refuse one
channel, and CMYK JPEGs decode only to RGB), then greyscale is taken from RGB.

`check_file` is the cheap up-front test of one file: its header (through Pillow,
which reads a few hundred bytes; a WebP's by hand, as Pillow opens a WebP only whole)
and its end (a JPEG ends with EOI, a PNG with IEND, a GIF with its trailer, a WebP is
as long as its RIFF header says), so empty, non-image and truncated files are found before
the run starts, not in the middle of an epoch. The header also gives a JPEG's EXIF
orientation: a camera held sideways stores the picture sideways and says so there.
Viewers apply it; TensorFlow's decoders (and so Keras' image_dataset_from_directory)
do not. `decode` applies it when given (`orient`), so a folder of phone photos trains
upright, as the user sees it.
"""

from __future__ import annotations

import dataclasses
import io
import threading

import tensorflow as tf

# .jfif and .jpe are JPEG files: Windows saves photos from a browser as .jfif.
EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".webp", ".bmp", ".gif")
RESIZE_MODES = ("crop", "pad", "stretch")
_HEAD_BYTES = 1 << 16  # enough for the header of almost every file
_TRAILERS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",), "GIF": (b";",)}


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """What the header of one image file says."""

    path: str
    height: int  # as displayed: after the EXIF orientation
    width: int
    channels: int  # 1 for greyscale, 3 for everything else (alpha and palettes become RGB)
    format: str
    orientation: int = 1  # a JPEG's EXIF orientation, 1-8 (1: stored upright)
    size: int = 0  # the file's length in bytes


class BadImage(Exception):
    """One file cannot be used; the message says why."""


ORIENTATION_TAG = 0x0112  # EXIF's Orientation


def _orientation(im) -> int:
    """A JPEG's EXIF orientation (1-8), 1 when it has none or it is unreadable."""
    if im.format not in ("JPEG", "MPO"):
        return 1
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # damaged EXIF data: the pixels are still there, as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _webp_header(head: bytes) -> tuple[str, str, tuple[int, int], int, bool] | None:
    """`_identify` for a WebP, from its first 30 bytes: Pillow opens a WebP only whole
    (libwebp's decoder wants all of it), and the check reads only the head of a file.
    None if the head is not a WebP's. Layouts: the WebP container specification."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk, body = head[12:16], head[20:]
    if chunk == b"VP8 " and body[3:6] == b"\x9d\x01\x2a":  # lossy: a VP8 key frame
        size = (int.from_bytes(body[6:8], "little") & 0x3FFF,
                int.from_bytes(body[8:10], "little") & 0x3FFF)
        return "WEBP", "RGB", size, 1, False
    if chunk == b"VP8L" and body[0] == 0x2F:  # lossless: 14-bit sides minus one, alpha bit
        bits = int.from_bytes(body[1:5], "little")
        size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        return "WEBP", "RGBA" if bits >> 28 & 1 else "RGB", size, 1, False
    if chunk == b"VP8X":  # extended: flags, then 24-bit canvas sides minus one
        size = (int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1)
        return "WEBP", "RGBA" if body[0] & 0x10 else "RGB", size, 1, bool(body[0] & 0x02)
    return None


_PILLOW_LIMIT = threading.Lock()


def _identify(head: bytes) -> tuple[str, str, tuple[int, int], int, bool]:
    """(format, mode, (width, height) as stored, EXIF orientation, animated) from the first
    bytes of a file, by Pillow (a WebP's by `_webp_header`)."""
    from PIL import Image, UnidentifiedImageError

    webp = _webp_header(head)
    if webp:
        return webp
    try:
        # Pillow's decompression-bomb limit (an error over 179 Mpx, a warning over 89)
        # guards Pillow's decoding; here it reads a header, and TensorFlow decodes: a
        # 200-Mpx scan or panorama was Pillow's traceback. The limit is Pillow's global:
        # lifted under a lock, for this read only.
        with _PILLOW_LIMIT:
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(io.BytesIO(head)) as im:
                    return (im.format, im.mode, im.size, _orientation(im),
                            bool(getattr(im, "is_animated", False)))
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except UnidentifiedImageError:
        raise BadImage("not an image (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"a truncated or damaged image ({e})") from None


def check_file(path: str) -> FileInfo:
    """Reads the header and the end of `path` (through tf.io.gfile).

    Raises:
      BadImage: unreadable, empty, not an image, an unsupported format, or truncated.
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            size = f.size()
            if size == 0:
                raise BadImage("an empty (zero-byte) file")
            head = f.read(min(size, _HEAD_BYTES))
            try:
                fmt, mode, (width, height), orientation, animated = _identify(head)
            except BadImage:
                if size <= len(head):
                    raise
                f.seek(0)  # the header is longer than we read (large EXIF or ICC data)
                fmt, mode, (width, height), orientation, animated = _identify(f.read())
            if fmt == "MPO":  # a JPEG with extra frames (many cameras write these)
                fmt = "JPEG"
            if fmt not in ("JPEG", "PNG", "WEBP", "BMP", "GIF"):
                raise BadImage(f"a {fmt} image; tapeloop reads JPEG, PNG, WebP, BMP and GIF")
            if fmt == "WEBP" and animated:  # TensorFlow decodes those only as RGBA frames
                raise BadImage("an animated WebP; tapeloop reads still WebP images")
            trailers = _TRAILERS.get(fmt)
            if trailers:
                f.seek(max(0, size - 64))
                tail = f.read().rstrip(b"\x00\r\n ")  # some writers pad after the end marker
                if not tail.endswith(trailers):
                    raise BadImage(f"a truncated {fmt} (it does not end with the {fmt} end marker)")
            elif fmt == "BMP":
                declared = int.from_bytes(head[2:6], "little")
                if declared and size < declared:
                    raise BadImage(f"a truncated BMP ({size} of {declared} bytes)")
                _check_bmp_layout(head)
            elif fmt == "WEBP":  # a RIFF file: its length follows "RIFF"
                declared = int.from_bytes(head[4:8], "little") + 8
                if size < declared:
                    raise BadImage(f"a truncated WebP ({size} of {declared} bytes)")
    except tf.errors.PermissionDeniedError:
        raise BadImage("not readable (permission denied)") from None
    except tf.errors.OpError as e:
        raise BadImage(f"not readable ({e.message})") from None
    channels = 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    _check_decodable(width * height)
    if orientation >= 5:  # turned by 90 degrees: displayed with the sides swapped
        height, width = width, height
    return FileInfo(path, height, width, channels, fmt, orientation, size)


def _check_bmp_layout(head: bytes) -> None:
    """TensorFlow's BMP decoder reads uncompressed pixels of 24 or 32 bits, and 8 bits as
    grey levels: it ignores a palette and compression. A colour palette's indices decoded as
    grey, and RLE, 1-, 4- and 16-bit pixels as noise or an error mid-run: such files are
    named up front."""
    dib = int.from_bytes(head[14:18], "little")
    if dib < 40 or len(head) < 54:  # OS/2's 12-byte header: 24-bit only in practice
        return
    bits = int.from_bytes(head[28:30], "little")
    compression = int.from_bytes(head[30:34], "little")
    what = "an RLE-compressed BMP" if compression in (1, 2) else "a BMP"
    if bits in (24, 32) and compression in (0, 3):  # BI_RGB, BI_BITFIELDS
        return
    if bits == 8 and compression == 0:
        used = int.from_bytes(head[46:50], "little") or 256
        start = 14 + dib
        palette = head[start:start + 4 * used]
        if all(palette[4 * i] == palette[4 * i + 1] == palette[4 * i + 2] == i
               for i in range(len(palette) // 4)):
            return  # grey levels: the indices are the pixels
        raise BadImage("a BMP of 8-bit colour-palette pixels (TensorFlow's decoder reads "
                       "them as grey levels; saved as PNG it reads right)")
    raise BadImage(f"{what} of {bits}-bit pixels (TensorFlow's decoder cannot read them; "
                   "saved as PNG it reads right)")


# Host bytes per pixel at the peak of a large image's decode and shrink (uint8 RGB, then
# float32): 5 GB for a 200-Mpx PNG, by /usr/bin/time -v.
DECODE_BYTES_PER_PIXEL = 25


def _check_decodable(pixels: int) -> None:
    """A file of more pixels than this machine's memory can decode (a decompression bomb:
    a 1-bit PNG of 10 Gpx is a few MB) is a bad image up front, not a process the kernel
    kills mid-run."""
    if pixels < 100_000_000:
        return
    from core.data import available_memory

    need, have = pixels * DECODE_BYTES_PER_PIXEL, available_memory()
    if have is not None and need > have:
        raise BadImage(f"{pixels / 1e6:,.0f} Mpx, which would need about {need / 1e9:,.0f} "
                       f"GB of memory to decode ({have / 1e9:,.0f} GB available)")


def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """uint8 [h, w, c] as stored -> as displayed, by its EXIF orientation (1-8): the
    transforms of Pillow's ImageOps.exif_transpose. Traced."""
    def turned(x):  # transposed, [h, w, c] -> [w, h, c] (5-8 swap the sides), as a gather:
        # TensorFlow's CPU transpose of uint8 logs an oneDNN error line on some CPUs, and
        # Grappler turns a detour through float32 back into a uint8 transpose.
        shape = tf.shape(x)
        h, w = shape[0], shape[1]
        k = tf.range(h * w)  # output pixel k = (k // h, k % h) is input pixel (k % h, k // h)
        pixels = tf.gather(tf.reshape(x, [h * w, shape[2]]), (k % h) * w + k // h)
        return tf.reshape(pixels, [w, h, shape[2]])

    out = tf.switch_case(tf.cast(tf.clip_by_value(orientation, 1, 8) - 1, tf.int32), [
        lambda: image,                              # 1: upright
        lambda: tf.reverse(image, [1]),             # 2: mirrored left-right
        lambda: tf.reverse(image, [0, 1]),          # 3: turned 180 degrees
        lambda: tf.reverse(image, [0]),             # 4: mirrored top-bottom
        lambda: turned(image),                      # 5: transposed
        lambda: tf.reverse(turned(image), [1]),     # 6: turned 90 degrees clockwise
        lambda: tf.reverse(turned(image), [0, 1]),  # 7: transversed
        lambda: tf.reverse(turned(image), [0]),     # 8: turned 90 degrees anticlockwise
    ])
    out.set_shape([None, None, image.shape[-1]])
    return out


JPEG_RATIOS = (1, 2, 4, 8)  # the DCT scalings libjpeg decodes to directly


def jpeg_ratio(height, width, size: tuple[int, int]) -> tf.Tensor:
    """The largest of JPEG_RATIOS that decodes an h x w JPEG to no less than `size` on
    either side (so nothing is upscaled that was not): an index into JPEG_RATIOS."""
    room = tf.minimum(tf.cast(height, tf.float32) / size[0], tf.cast(width, tf.float32) / size[1])
    return tf.reduce_sum(tf.cast(tf.constant(JPEG_RATIOS[1:], tf.float32) <= room, tf.int32))


def static_jpeg_ratio(height: int, width: int, size: tuple[int, int]) -> int:
    """`jpeg_ratio` in Python, for a JPEG whose size is known up front: the ratio itself."""
    room = min(height / size[0], width / size[1])
    return max(r for r in JPEG_RATIOS if r <= max(room, 1))


def decoded_size(info: FileInfo, jpeg_ratio: int | None) -> tuple[int, int]:
    """(height, width) that `decode`'s decoder returns for this file, before resizing:
    libjpeg at 1/ratio scale rounds up."""
    if info.format == "JPEG" and jpeg_ratio:
        return -(-info.height // jpeg_ratio), -(-info.width // jpeg_ratio)
    return info.height, info.width


def decode(contents: tf.Tensor, size: tuple[int, int], channels: int,
           resize: str = "crop", downscale_jpeg: bool = True,
           fixed_ratio: int | None = None, exact: bool = False,
           orientation: tf.Tensor | None = None) -> tf.Tensor:
    """Image bytes -> uint8 [size[0], size[1], channels]. Traced (tf.data map).

    A JPEG at least twice the output size on both sides is decoded at 1/2, 1/4 or 1/8
    scale by libjpeg itself (`ratio`), then resized the rest of the way: much less
    work, and within a few grey levels of decoding it whole (benchmarks/NOTES.md).
    `fixed_ratio`: every input is a JPEG to decode at this ratio (known up front): no
    header read, no branch.
    `exact`: every input decodes to exactly `size` (at `fixed_ratio` if given; known up
    front): no resize and no branch, only a check of the shape (benchmarks/NOTES.md 13:
    the branch alone costs 5-8% of the folder path).
    `orientation`: the file's EXIF orientation (`check_file`), applied after decoding
    and before resizing, so `size` and `exact` are about the image as displayed.
    """
    def whole():
        return tf.io.decode_image(contents, channels=3, expand_animations=False)

    if fixed_ratio is not None and downscale_jpeg:
        image = tf.io.decode_jpeg(contents, channels=3, ratio=fixed_ratio)
    elif downscale_jpeg and not exact:
        def smaller():
            shape = tf.io.extract_jpeg_shape(contents)
            h, w = shape[0], shape[1]
            if orientation is not None:  # the ratio is about the image as displayed
                turned = orientation >= 5
                h, w = tf.where(turned, w, h), tf.where(turned, h, w)
            index = jpeg_ratio(h, w, size)
            return tf.switch_case(index, [
                (lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r))
                for r in JPEG_RATIOS])

        is_jpeg = tf.equal(tf.strings.substr(contents, 0, 3), b"\xff\xd8\xff")
        image = tf.cond(is_jpeg, smaller, whole)
    else:
        image = whole()
    if orientation is not None:
        image = orient(image, orientation)
    image = tf.ensure_shape(image, [*size, 3]) if exact else image
    image.set_shape([None, None, 3])
    if channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    return image if exact else fit(image, size, resize)


def decode_raw(contents: tf.Tensor, height: tf.Tensor, width: tf.Tensor, stored_channels: int,
               size: tuple[int, int], channels: int, resize: str = "crop") -> tf.Tensor:
    """Raw pixel bytes (TF-slim's `image/format` "raw": uint8, height x width x
    stored_channels) -> uint8 [size[0], size[1], channels]. Traced. A record whose byte
    count is not height * width * stored_channels fails (InvalidArgumentError), like a
    damaged PNG."""
    image = tf.reshape(tf.io.decode_raw(contents, tf.uint8),
                       tf.stack([tf.cast(height, tf.int32), tf.cast(width, tf.int32),
                                 stored_channels]))
    if stored_channels in (2, 4):  # drop the alpha channel
        image = image[..., :stored_channels - 1]
    if image.shape[-1] == 1 and channels == 3:
        image = tf.image.grayscale_to_rgb(image)
    elif image.shape[-1] == 3 and channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    return fit(image, size, resize)


def fit(image: tf.Tensor, size: tuple[int, int], resize: str = "crop") -> tf.Tensor:
    """uint8 [h, w, c] -> uint8 [H, W, c] by `resize` (crop, pad or stretch). Traced."""
    height, width = int(size[0]), int(size[1])
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    same = tf.logical_and(tf.equal(h, height), tf.equal(w, width))

    def halve_while_twice_the_size(x):
        """Box-filters by 2, 4 or 8 (the largest that leaves both sides at least the
        output's): an antialiased shrink at a fraction of a wide-kernel resize's cost."""
        s_ = tf.shape(x)
        room = tf.minimum(s_[0] // height, s_[1] // width)
        index = tf.reduce_sum(tf.cast(tf.constant([2, 4, 8]) <= room, tf.int32))
        y = tf.switch_case(index, [lambda: x] + [
            (lambda k=k: tf.nn.avg_pool2d(x[None], k, k, "VALID")[0]) for k in (2, 4, 8)])
        y.set_shape([None, None, x.shape[-1]])
        return y

    def to_size(x):
        """float [h', w', c] -> [height, width, c]; no resize when already there."""
        s_ = tf.shape(x)
        done = tf.logical_and(tf.equal(s_[0], height), tf.equal(s_[1], width))
        y = tf.cond(done, lambda: x,
                    lambda: tf.image.resize(x, [height, width], antialias=True))
        y.set_shape([height, width, x.shape[-1]])
        return y

    def pad_to_size(x):
        """float [h', w', c] -> [height, width, c]: scaled to fit, centred on black, as
        tf.image.resize_with_pad, whose scaled short side of a thin image (1x1000 to
        32x32) is 0 px, an error: kept at 1 px here."""
        s_ = tf.cast(tf.shape(x)[:2], tf.float32)
        target = tf.constant([height, width], tf.float32)
        scaled = s_ / tf.reduce_max(s_ / target)
        new = tf.maximum(tf.cast(tf.floor(scaled), tf.int32), 1)
        top_left = tf.maximum(tf.cast(tf.floor((target - scaled) / 2), tf.int32), 0)
        y = tf.image.resize(x, new, antialias=True)
        return tf.image.pad_to_bounding_box(y, top_left[0], top_left[1], height, width)

    def resized():
        x = image
        if resize == "crop":  # the largest centred window of the target's aspect ratio
            crop_h = tf.minimum(h, tf.cast(tf.round(tf.cast(w * height, tf.float32) / width),
                                           tf.int32))
            crop_w = tf.minimum(w, tf.cast(tf.round(tf.cast(h * width, tf.float32) / height),
                                           tf.int32))
            crop_h, crop_w = tf.maximum(crop_h, 1), tf.maximum(crop_w, 1)
            top, left = (h - crop_h) // 2, (w - crop_w) // 2
            x = x[top:top + crop_h, left:left + crop_w]  # uint8: a cheap slice
            x = to_size(halve_while_twice_the_size(tf.cast(x, tf.float32)))
        elif resize == "pad":
            x = pad_to_size(halve_while_twice_the_size(tf.cast(x, tf.float32)))
        else:
            x = to_size(halve_while_twice_the_size(tf.cast(x, tf.float32)))
        return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)

    out = tf.cond(same, lambda: image, resized)
    out.set_shape([height, width, image.shape[-1]])
    return out
