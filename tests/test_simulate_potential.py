"""The electrostatic potential of the atomic model, checked against gemmi, and the structure reader."""

from __future__ import annotations

import math

import gemmi
import pytest
import torch

from conftest import STRUCTURE, gemmi_potential_V
from tomopipe.algorithms.fsc import fsc, shell_frequencies_per_A
from tomopipe.algorithms.potential import (
    POTENTIAL_CONSTANT_V_A2,
    atomic_potential_volume,
    excluded_volumes_A3,
    interaction_constant_rad_per_V_A,
)
from tomopipe.errors import InputFileError
from tomopipe.io.atomic_model import read_atomic_model
from tomopipe.simulate.specimen import (
    amorphous_ice_structure_factor,
    ice_mean_potential_V,
    ice_potential_field,
    ice_projected_potential_psd,
    place_particles,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """The file's atoms only (gemmi computes the same atoms for the independent check)."""
    assert STRUCTURE.is_file(), f"the apoferritin model is expected at {STRUCTURE}"
    return read_atomic_model(STRUCTURE, implicit_hydrogens=False)


def test_constants():
    assert POTENTIAL_CONSTANT_V_A2 == pytest.approx(47.878, rel=1e-4)  # h²/(2π m0 e)
    assert interaction_constant_rad_per_V_A(300.0) == pytest.approx(6.526e-4, rel=2e-3)
    assert interaction_constant_rad_per_V_A(200.0) == pytest.approx(7.288e-4, rel=2e-3)
    # amorphous ice, independent atom model at 0.94 g/cm³: 4.5-4.6 V (measured 3.5-4.5 V)
    assert 4.4 < ice_mean_potential_V(0.94) < 4.7


def test_model_reading(model):
    assert model.n_atoms == 32618 and model.n_chains == 24
    assert set(model.element_symbols) == {"C", "N", "O", "S", "Na", "Mg"}
    assert float(model.positions_A.mean(0).abs().max()) < 1e-9  # centred
    assert 60 < model.radius_A < 70  # apoferritin: ~12-13 nm across
    volume = float(excluded_volumes_A3(model).sum())
    assert volume == pytest.approx(1.2288 * model.mass_Da() * 1.075, rel=1e-3)  # 0.74 cm³/g, with hydrogens


def test_fsc_against_gemmi_to_twice_the_pixel(model):
    """The true map agrees with gemmi's independent electron-scattering map up to Nyquist (2 × pixel)."""
    box, pixel = 128, 1.58
    ours = atomic_potential_volume(model, box, pixel).double()
    theirs = gemmi_potential_V(box, pixel, model.centre_A, oversampling=2, cutoff=1e-7)
    curve = fsc(ours, theirs)
    assert float(curve[1:].min()) >= 0.99, curve
    freqs = shell_frequencies_per_A(box, pixel)
    assert float(freqs[-1]) == pytest.approx(1 / (2 * pixel))
    # same absolute scale: integral and per-shell amplitudes
    assert float(ours.sum() / theirs.sum()) == pytest.approx(1.0, abs=0.005)
    amp_ours = torch.fft.rfftn(ours).abs().pow(2).sum()
    amp_theirs = torch.fft.rfftn(theirs).abs().pow(2).sum()
    assert float(amp_ours / amp_theirs) == pytest.approx(1.0, abs=0.01)
    # integral = K·Σ occupancy·f(0), the scattering factors at s = 0
    f0 = sum(sum(gemmi.Element(s).c4322.a) * int((model.element_index == i).sum())
             for i, s in enumerate(model.element_symbols))
    assert float(ours.sum()) * pixel**3 == pytest.approx(POTENTIAL_CONSTANT_V_A2 * f0, rel=2e-3)


COARSE_BOX, COARSE_PIXEL, V_ICE = 48, 3.16, 4.5


@pytest.fixture(scope="module")
def coarse_maps(model):
    vacuum = atomic_potential_volume(model, COARSE_BOX, COARSE_PIXEL).double()
    contrast = atomic_potential_volume(model, COARSE_BOX, COARSE_PIXEL, ice_potential_V=V_ICE).double()
    return vacuum, contrast


def test_fsc_against_gemmi_coarse_pixel(model, coarse_maps):
    theirs = gemmi_potential_V(COARSE_BOX, COARSE_PIXEL, model.centre_A, oversampling=4, cutoff=1e-7)
    assert float(fsc(coarse_maps[0], theirs)[1:].min()) >= 0.99


def test_implicit_hydrogens():
    heavy = read_atomic_model(STRUCTURE, implicit_hydrogens=False)
    with_h = read_atomic_model(STRUCTURE)
    st = gemmi.read_structure(str(STRUCTURE))
    st.remove_waters()
    expected = sum(
        gemmi.find_tabulated_residue(r.name).hydrogen_count
        - (2 if gemmi.find_tabulated_residue(r.name).is_amino_acid() else 0)
        for ch in st[0] for r in ch
    )
    assert with_h.n_implicit_hydrogens == pytest.approx(expected) and 7.5 < expected / 4176 < 8.5  # ~8 H per residue
    assert with_h.mass_Da() == pytest.approx(heavy.mass_Da() + expected * gemmi.Element("H").weight)
    assert torch.equal(with_h.positions_A, heavy.positions_A)  # same atoms and centre; hydrogens ride on C and N
    carriers = torch.tensor([with_h.element_symbols[i] in ("C", "N") for i in with_h.element_index.tolist()])
    assert float(with_h.hydrogens[~carriers].abs().sum()) == 0.0 and heavy.hydrogens is None
    # hydrogens add ~18 % to the integrated potential (independent atom model)
    box, pixel = 40, 4.0
    ratio = float(atomic_potential_volume(with_h, box, pixel).sum() / atomic_potential_volume(heavy, box, pixel).sum())
    f_h = sum(gemmi.Element("H").c4322.a)
    assert ratio == pytest.approx(1 + expected * f_h / 3.69e6 * POTENTIAL_CONSTANT_V_A2, rel=0.01)


def test_solvent_exclusion_removes_the_displaced_ice(model, coarse_maps):
    box, pixel, v_ice = COARSE_BOX, COARSE_PIXEL, V_ICE
    vacuum, contrast = coarse_maps
    displaced = float((vacuum.sum() - contrast.sum()) * pixel**3)
    assert displaced == pytest.approx(v_ice * float(excluded_volumes_A3(model).sum()), rel=1e-3)
    # the hollow centre of apoferritin holds ice: no solvent removed there
    c = box // 2
    assert abs(float(contrast[c, c, c] - vacuum[c, c, c])) < 0.05 * v_ice


def test_assembly_is_built_from_one_chain(tmp_path):
    st = gemmi.read_structure(str(STRUCTURE))
    st.remove_waters()
    model = st[0]
    for name in [ch.name for ch in model][1:]:
        model.remove_chain(name)
    n_one = model.count_atom_sites()
    gen = gemmi.Assembly.Gen()
    gen.chains = ["A"]
    identity, turn = gemmi.Assembly.Operator(), gemmi.Assembly.Operator()
    identity.name, turn.name = "1", "2"
    identity.transform = gemmi.Transform()
    transform = gemmi.Transform()
    transform.mat.fromlist([[-1, 0, 0], [0, -1, 0], [0, 0, 1]])
    transform.vec.fromlist([200.0, 200.0, 0.0])
    turn.transform = transform
    gen.operators.append(identity)
    gen.operators.append(turn)
    assembly = gemmi.Assembly("1")
    assembly.generators.append(gen)
    st.assemblies.clear()
    st.assemblies.append(assembly)
    path = tmp_path / "one_chain.cif"
    st.make_mmcif_document().write_file(str(path))
    built = read_atomic_model(path, implicit_hydrogens=False)
    assert built.n_atoms == 2 * n_one and built.n_chains == 2
    as_is = read_atomic_model(path, build_assembly=False, implicit_hydrogens=False)
    assert as_is.n_atoms == n_one
    # the copy sits where the operator puts it: the model's centroid moves to the 2-fold axis
    assert float(built.positions_A[:n_one, 2].mean()
                 - built.positions_A[n_one:, 2].mean()) == pytest.approx(0, abs=1e-6)


def test_unreadable_structure(tmp_path):
    bad = tmp_path / "garbage.pdb"
    bad.write_text("this is not a structure\n")
    with pytest.raises(InputFileError, match="garbage.pdb"):
        read_atomic_model(bad)
    with pytest.raises(InputFileError, match="not found"):
        read_atomic_model(tmp_path / "missing.cif")


def test_ice_background_is_not_white_and_has_the_right_power():
    s = amorphous_ice_structure_factor(torch.tensor([0.0, 0.1, 0.269, 0.4]))
    assert float(s[0]) == pytest.approx(0.05, abs=1e-6) and float(s[2]) > 2.0 and float(s[1]) < 1.0
    pixel, shape, path = 1.0, (256, 256), 500.0
    field = ice_potential_field(shape, pixel, path, 0.94, torch.Generator().manual_seed(0))
    spectrum = torch.fft.rfft2(field.double()).abs() ** 2 / (shape[0] * shape[1]) * pixel**2  # periodogram
    ky = torch.fft.fftfreq(shape[0], d=pixel)[:, None]
    kx = torch.fft.rfftfreq(shape[1], d=pixel)[None, :]
    q = torch.sqrt(ky**2 + kx**2)
    ring = (q > 0.25) & (q < 0.29)
    low = (q > 0.03) & (q < 0.08)
    expected_ring = float(ice_projected_potential_psd(q[ring].double(), path, 0.94).mean())
    assert float(spectrum[ring].mean()) == pytest.approx(expected_ring, rel=0.1)
    # the water ring at 3.7 Å is much stronger than low frequencies (S(q) of amorphous ice)
    assert float(spectrum[ring].mean()) > 5 * float(spectrum[low].mean())
    # variance grows with the path length through the ice
    thicker = ice_potential_field(shape, pixel, 4 * path, 0.94, torch.Generator().manual_seed(0))
    assert float(thicker.std() / field.std()) == pytest.approx(2.0, rel=1e-4)


def test_particles_do_not_overlap():
    g = torch.Generator().manual_seed(3)
    pos = place_particles(15, (400.0, 400.0, 100.0), 60.0, 4.0, g)
    d = torch.cdist(pos, pos) + torch.eye(15) * 1e9
    assert float(d.min()) >= 124.0
    assert float((pos.abs() - torch.tensor([340.0, 340.0, 40.0])).max()) <= 1e-9
    with pytest.raises(ValueError, match="does not fit"):
        place_particles(1, (400.0, 400.0, 50.0), 60.0, 4.0, g)
    with pytest.raises(ValueError, match="could only place"):
        place_particles(500, (400.0, 400.0, 100.0), 60.0, 4.0, g, max_attempts=5)
    assert math.isfinite(float(pos.sum()))
