"""Data that ships with tomopipe: the packaged apoferritin model is the deposited PDB 6Z6U file,
and every real test file in tests/data is accounted for in tests/data/SOURCES.md."""

from __future__ import annotations

import gzip
import hashlib
import re

import torch

from conftest import NOT_SHIPPED, SHARED_DATA
from tomopipe.data import APOFERRITIN_MODEL
from tomopipe.io.atomic_model import read_atomic_model
from tomopipe.simulate.config import default_structure_path

#: sha256 of the uncompressed 6z6u.pdb (the deposited wwPDB file; src/tomopipe/data/SOURCES.md).
SHA256_6Z6U_PDB = "c957bed8155838aec3e6c3bb3ebabd2a9edab6683ad9d08ff2017afe3185a8b0"


def test_packaged_model_is_6z6u_and_reads_like_the_uncompressed_file(tmp_path, monkeypatch):
    monkeypatch.delenv("TOMOPIPE_STRUCTURE", raising=False)
    assert default_structure_path() == APOFERRITIN_MODEL
    text = gzip.decompress(APOFERRITIN_MODEL.read_bytes())
    assert hashlib.sha256(text).hexdigest() == SHA256_6Z6U_PDB
    plain = tmp_path / "6z6u.pdb"
    plain.write_bytes(text)
    packed, unpacked = read_atomic_model(APOFERRITIN_MODEL), read_atomic_model(plain)
    assert packed.n_chains == 24 and packed.element_symbols == ("C", "Mg", "N", "Na", "O", "S")
    assert packed.n_atoms == unpacked.n_atoms > 30_000
    for name in ("positions_A", "element_index", "b_factors_A2", "occupancies", "hydrogens"):
        torch.testing.assert_close(getattr(packed, name), getattr(unpacked, name), rtol=0, atol=0)
    assert packed.centre_A == unpacked.centre_A


def _sources_entries() -> dict[str, str | None]:
    """``{relative path: sha256 or None}`` of the ``### `path``` entries of tests/data/SOURCES.md."""
    text = (SHARED_DATA / "SOURCES.md").read_text(encoding="utf-8")
    entries = {}
    for block in re.split(r"^### ", text, flags=re.M)[1:]:
        name = re.match(r"`([^`]+)`", block)
        assert name, f"tests/data/SOURCES.md: entry without a `path` heading: {block[:60]!r}"
        sha = re.search(r"sha256[^`\n]*`([0-9a-f]{64})`", block)
        entries[name.group(1)] = sha.group(1) if sha else None
    return entries


def test_every_test_data_file_has_a_source_entry_and_its_checksum():
    entries = _sources_entries()
    files = {p.relative_to(SHARED_DATA).as_posix() for p in SHARED_DATA.rglob("*") if p.is_file()}
    files.discard("SOURCES.md")
    assert sorted(files - set(entries)) == [], "files in tests/data without an entry in tests/data/SOURCES.md"
    assert sorted(set(entries) - files) == [], "tests/data/SOURCES.md lists files that are not there"
    for name, sha in entries.items():
        if sha is not None:
            digest = hashlib.sha256((SHARED_DATA / name).read_bytes()).hexdigest()
            assert digest == sha, f"tests/data/{name}: sha256 {digest} differs from SOURCES.md"
    assert not files & set(NOT_SHIPPED), "a file whose licence does not allow shipping is in tests/data"

