"""CURVE key files in ZeroMQ's certificate format (pure Python, no libzmq).

The files are those ``zmq.auth.create_certificates`` writes and
``zmq.auth.load_certificate`` reads, so keys made by other ZeroMQ tools work:
``NAME.key`` holds the public key, ``NAME.key_secret`` the public and the secret key::

    #   ZeroMQ CURVE Public Certificate
    metadata
    curve
        public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"

Keys are 40-character Z85 strings. A secret key file must be mode 0600 (not group
or world readable); :func:`load_secret_key` refuses it otherwise. Generating a key
pair needs libzmq (``zmq.curve_keypair``) and so lives in the daemons, which then
call :func:`write_keypair`.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> pub = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
>>> sec = "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"
>>> _ = write_keypair(d, "press-07", pub, sec)
>>> load_public_key(f"{d}/press-07.key") == pub, load_secret_key(f"{d}/press-07.key_secret") == sec
(True, True)
>>> public_keys_in(d)
{'press-07': 'rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7'}
"""
from __future__ import annotations

import datetime
import os
import re
import stat
from pathlib import Path

from fedgate.core.errors import SecurityError

__all__ = [
    "PUBLIC_SUFFIX",
    "SECRET_SUFFIX",
    "valid_z85_key",
    "write_keypair",
    "write_public_key",
    "load_public_key",
    "load_secret_key",
    "load_keypair",
    "public_keys_in",
]

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_Z85_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_KEY = re.compile("[" + re.escape(_Z85_CHARS) + "]{40}\\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_MAX_KEY_FILE = 64 * 1024

_PUBLIC_BANNER = """#   ****  Generated on {now} by fedgate  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or verify the contents of this file after exchange.

"""
_SECRET_BANNER = """#   ****  Generated on {now} by fedgate  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""


def valid_z85_key(key: object) -> bool:
    """True for a 40-character Z85 string (a 32-byte CURVE key)."""
    return isinstance(key, str) and _Z85_KEY.match(key) is not None


def _check_name(name: str) -> None:
    if not isinstance(name, str) or _NAME_RE.match(name) is None:
        raise SecurityError(f"key name {name!r} is not valid (letters, digits, '.', '_', '-'; at most 128)")


def _check_key(key: str, what: str) -> str:
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not valid_z85_key(key):
        raise SecurityError(f"{what} is not a 40-character Z85 key")
    return key


def _certificate(banner: str, public_z85: str, secret_z85: str | None) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    text = banner.format(now=now) + "metadata\ncurve\n" + f'    public-key = "{public_z85}"\n'
    if secret_z85 is not None:
        text += f'    secret-key = "{secret_z85}"\n'
    return text


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_public_key(directory: str | os.PathLike[str], name: str, public_z85: str) -> Path:
    """Write ``directory/NAME.key`` (mode 0644) and return its path."""
    _check_name(name)
    public_z85 = _check_key(public_z85, "public key")
    path = Path(directory) / f"{name}{PUBLIC_SUFFIX}"
    _write_atomic(path, _certificate(_PUBLIC_BANNER, public_z85, None), 0o644)
    return path


def write_keypair(directory: str | os.PathLike[str], name: str, public_z85: str,
                  secret_z85: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) into ``directory``.

    Returns
    -------
    (public_path, secret_path)

    Raises
    ------
    SecurityError
        A key is not a Z85 key or the name is not a valid file stem.
    """
    _check_name(name)
    public_z85 = _check_key(public_z85, "public key")
    secret_z85 = _check_key(secret_z85, "secret key")
    os.makedirs(directory, exist_ok=True)
    secret_path = Path(directory) / f"{name}{SECRET_SUFFIX}"
    _write_atomic(secret_path, _certificate(_SECRET_BANNER, public_z85, secret_z85), 0o600)
    public_path = write_public_key(directory, name, public_z85)
    return public_path, secret_path


def _read_fields(path: Path) -> dict[str, str]:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError as exc:
        raise SecurityError(f"{path}: key file not found") from exc
    except OSError as exc:
        raise SecurityError(f"{path}: cannot read key file: {exc.strerror}") from exc
    if len(data) > _MAX_KEY_FILE:
        raise SecurityError(f"{path}: not a key file (larger than {_MAX_KEY_FILE} bytes)")
    out: dict[str, str] = {}
    for line in data.splitlines():
        line = line.strip()
        if line.startswith(b"#"):
            continue
        for field in (b"public-key", b"secret-key"):
            if line.startswith(field) and b"=" in line and field.decode() not in out:
                out[field.decode()] = line.split(b"=", 1)[1].strip(b" \t'\"").decode("ascii", "replace")
    return out


def load_public_key(path: str | os.PathLike[str]) -> str:
    """The Z85 public key of a certificate file (``.key`` or ``.key_secret``)."""
    path = Path(path)
    key = _read_fields(path).get("public-key")
    if key is None:
        raise SecurityError(f"{path}: no public-key in the certificate")
    return _check_key(key, f"{path}: public-key")


def _check_mode(path: Path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise SecurityError(f"{path}: key file not found") from exc
    except OSError as exc:
        raise SecurityError(f"{path}: cannot stat key file: {exc.strerror}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(
            f"{path}: secret key file has mode {stat.S_IMODE(st.st_mode):04o}; it must not be "
            f"group or world accessible (chmod 600 {path})"
        )


def load_secret_key(path: str | os.PathLike[str]) -> str:
    """The Z85 secret key of ``NAME.key_secret``; refuses a group/world-readable file."""
    path = Path(path)
    _check_mode(path)
    key = _read_fields(path).get("secret-key")
    if key is None:
        raise SecurityError(f"{path}: no secret-key in the certificate")
    return _check_key(key, f"{path}: secret-key")


def load_keypair(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(public_z85, secret_z85)`` from a ``.key_secret`` file (mode checked)."""
    path = Path(path)
    _check_mode(path)
    fields = _read_fields(path)
    if "public-key" not in fields or "secret-key" not in fields:
        raise SecurityError(f"{path}: needs both public-key and secret-key")
    return (_check_key(fields["public-key"], f"{path}: public-key"),
            _check_key(fields["secret-key"], f"{path}: secret-key"))


def public_keys_in(directory: str | os.PathLike[str]) -> dict[str, str]:
    """``{name: public_z85}`` for every ``NAME.key`` in ``directory``.

    Files whose stem is not a valid agent name, or that hold no valid public key,
    raise :class:`SecurityError` naming the file (an allow-list must not be
    half-read silently).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SecurityError(f"{directory}: key directory not found")
    out: dict[str, str] = {}
    for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
        if not path.is_file():
            continue
        name = path.name[: -len(PUBLIC_SUFFIX)]
        if _NAME_RE.match(name) is None:
            raise SecurityError(f"{path}: file name is not a valid agent name")
        key = load_public_key(path)
        if key in out.values():
            other = next(n for n, k in out.items() if k == key)
            raise SecurityError(f"{path}: the same public key as {other}{PUBLIC_SUFFIX}")
        out[name] = key
    return out
