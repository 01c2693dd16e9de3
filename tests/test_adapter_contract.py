"""Every backend implements the four Protocols of xfer/_adapter.py with their signatures,
and every backend package has the same files (docs/adding-a-backend.md)."""

from __future__ import annotations

import inspect
import pathlib

import pytest

from xfer import _config, semantics
from xfer._adapter import Adapter, load_adapter
from xfer.backends import _common

BACKENDS_DIR = pathlib.Path(_common.__file__).parent
FILES = {
    "__init__.py",
    "units.py",
    "weights.py",
    "engine.py",
    "models.py",
    "recalibration.py",
    "folding.py",
    "export.py",
    "semantics.py",
    "distributed.py",
}


@pytest.fixture
def backend(kit) -> str:
    return _config.flavour(kit.id).backend


def _shape(signature: inspect.Signature, drop_self: bool) -> list[tuple[str, object, object]]:
    """Names, kinds and defaults: what a caller relies on (annotations name each
    framework's own types, so they differ by design)."""
    parameters = list(signature.parameters.values())[1 if drop_self else 0 :]
    return [(p.name, p.kind, p.default) for p in parameters]


def test_every_backend_package_has_the_same_files():
    packages = sorted(p for p in BACKENDS_DIR.iterdir() if (p / "__init__.py").exists())
    assert [p.name for p in packages] == ["flax", "keras", "torch"]
    for package in packages:
        files = {p.name for p in package.glob("*.py")}
        assert files == FILES, f"{package.name}: {sorted(files ^ FILES)}"


def test_the_adapter_implements_each_protocol_with_its_signatures(backend):
    adapter = load_adapter(backend)
    assert isinstance(adapter, Adapter) and adapter.name == backend
    for role, protocol in _common.CONTRACTS.items():
        for member in _common.contract_members(protocol):
            expected = vars(protocol).get(member)
            if not inspect.isfunction(expected):
                assert hasattr(adapter, member), f"{backend}: {role} needs {member}"
                continue
            found = inspect.signature(getattr(adapter, member))
            assert _shape(found, False) == _shape(inspect.signature(expected), True), (
                f"{backend}.{role}.{member}{found} differs from "
                f"{protocol.__name__}.{member}{inspect.signature(expected)}"
            )


def test_a_backend_module_missing_a_member_is_refused_by_name(backend):
    import types

    package = __import__(f"xfer.backends.{backend}", fromlist=["units"])
    modules = {role: getattr(package, role) for role in _common.CONTRACTS}
    broken = types.ModuleType("broken_units")
    broken.__dict__.update(
        {k: v for k, v in vars(modules["units"]).items() if not k.startswith("__")}
    )
    del broken.set_mode
    with pytest.raises(AttributeError, match="broken_units does not define 'set_mode'"):
        _common.assemble(backend, **{**modules, "units": broken})


def test_semantics_probes_are_named_after_the_rows(backend):
    module = __import__(f"xfer.backends.{backend}.semantics", fromlist=["versions"])
    rows = {row.id for row in semantics.ROWS}
    probes = {
        name
        for name, value in vars(module).items()
        if inspect.isfunction(value)
        and value.__module__ == module.__name__
        and not name.startswith("_")
        and name != "versions"
    }
    assert probes <= rows, f"probes that no row asks for: {sorted(probes - rows)}"
    assert len(probes) >= 8
