"""Key files: ZeroMQ certificate format both ways, 0600 secrets, allow-list directories."""
from __future__ import annotations

import os

import pytest
import zmq
import zmq.auth

from fedgate.core.errors import SecurityError
from fedgate.core.keys import (
    load_keypair,
    load_public_key,
    load_secret_key,
    public_keys_in,
    valid_z85_key,
    write_keypair,
)


def _pair() -> tuple[str, str]:
    pub, sec = zmq.curve_keypair()
    return pub.decode(), sec.decode()


def test_written_keys_read_back_and_secret_is_0600(tmp_path):
    pub, sec = _pair()
    ppath, spath = write_keypair(tmp_path, "press-07", pub, sec)
    assert ppath.name == "press-07.key" and spath.name == "press-07.key_secret"
    assert os.stat(spath).st_mode & 0o777 == 0o600
    assert load_public_key(ppath) == pub
    assert load_secret_key(spath) == sec
    assert load_keypair(spath) == (pub, sec)
    assert "secret" not in ppath.read_text().split("curve", 1)[1]


def test_pyzmq_reads_our_files(tmp_path):
    pub, sec = _pair()
    _, spath = write_keypair(tmp_path, "a", pub, sec)
    assert zmq.auth.load_certificate(str(tmp_path / "a.key")) == (pub.encode(), None)
    assert zmq.auth.load_certificate(str(spath)) == (pub.encode(), sec.encode())


def test_we_read_pyzmq_files(tmp_path):
    ppath, spath = zmq.auth.create_certificates(str(tmp_path), "gw-1")
    os.chmod(spath, 0o600)
    pub, sec = zmq.auth.load_certificate(spath)
    assert load_public_key(ppath) == pub.decode()
    assert load_secret_key(spath) == sec.decode()
    assert public_keys_in(tmp_path) == {"gw-1": pub.decode()}


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_readable_secret_file_is_refused(tmp_path, mode):
    pub, sec = _pair()
    _, spath = write_keypair(tmp_path, "a", pub, sec)
    os.chmod(spath, mode)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_secret_key(spath)
    with pytest.raises(SecurityError, match="mode"):
        load_keypair(spath)


def test_bad_files_are_security_errors(tmp_path):
    (tmp_path / "empty.key").write_text("# nothing\n")
    with pytest.raises(SecurityError, match="no public-key"):
        load_public_key(tmp_path / "empty.key")
    (tmp_path / "short.key").write_text('curve\n    public-key = "abc"\n')
    with pytest.raises(SecurityError, match="Z85"):
        load_public_key(tmp_path / "short.key")
    with pytest.raises(SecurityError, match="not found"):
        load_public_key(tmp_path / "missing.key")
    with pytest.raises(SecurityError, match="not found"):
        load_secret_key(tmp_path / "missing.key_secret")
    (tmp_path / "big.key").write_bytes(b"#" * (70 * 1024))
    with pytest.raises(SecurityError, match="larger"):
        load_public_key(tmp_path / "big.key")
    with pytest.raises(SecurityError, match="not found"):
        public_keys_in(tmp_path / "nope")


def test_invalid_names_and_keys_are_refused(tmp_path):
    pub, sec = _pair()
    for name in ("../x", "", "a b", "-a"):
        with pytest.raises(SecurityError, match="name"):
            write_keypair(tmp_path, name, pub, sec)
    with pytest.raises(SecurityError, match="Z85"):
        write_keypair(tmp_path, "a", "short", sec)
    assert valid_z85_key(pub) and not valid_z85_key(pub[:-1]) and not valid_z85_key(pub[:-1] + "~")


def test_public_keys_in_lists_names_and_refuses_duplicates(tmp_path):
    keys = {}
    for name in ("gw-a", "gw-b"):
        pub, sec = _pair()
        write_keypair(tmp_path, name, pub, sec)
        keys[name] = pub
    (tmp_path / "notes.txt").write_text("ignored")
    assert public_keys_in(tmp_path) == keys
    (tmp_path / "gw-c.key").write_text((tmp_path / "gw-a.key").read_text())
    with pytest.raises(SecurityError, match="same public key"):
        public_keys_in(tmp_path)
