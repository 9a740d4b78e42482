"""Loading and saving ONNX files for the CLI: clear errors, atomic writes, large models.

Every problem a user can fix raises `ModelFileError` with a one-line message; a write either
leaves the complete output (and its external-data file) in place or nothing at all.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import onnx
from google.protobuf.message import DecodeError

__all__ = ["ModelFileError", "atomic_path", "check_output_path", "load_model", "save_model"]

# Protobuf cannot serialise a message over 2 GiB: larger models keep their weights beside them.
_PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_THRESHOLD = 1024  # tensors at least this many bytes go to the external-data file


class ModelFileError(ValueError):
    """A model file that cannot be used as given; the message says why in one line."""


def load_model(path: str) -> onnx.ModelProto:
    """The model at `path` (external data included), checked to be well-formed ONNX.

    Raises `ModelFileError` (one line) for a missing file, a directory, a file that is not ONNX,
    a missing or unreadable external-data file, an unsupported opset or a model ONNX's checker rejects.
    """
    if os.path.isdir(path):
        raise ModelFileError(f"{path}: is a directory, not an ONNX file")
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: not a regular file" if os.path.exists(path) else f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as error:
        raise ModelFileError(f"{path}: not a readable ONNX model ({_first_line(error)})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelFileError(f"{path}: not an ONNX model (no graph)")
    _check_external_data_files(model, path)
    try:
        onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except (onnx.checker.ValidationError, RuntimeError, ValueError, OSError) as error:
        raise ModelFileError(f"{path}: cannot read its external data ({_first_line(error)})") from None
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not 7 <= opset <= newest:
        raise ModelFileError(f"{path}: unsupported opset {opset} (supported: 7 to {newest})")
    try:
        onnx.checker.check_model(path if _has_external_data(model) else model)
    except (onnx.checker.ValidationError, RuntimeError, ValueError, OSError) as error:
        raise ModelFileError(f"{path}: invalid ONNX model ({_first_line(error)})") from None
    return model


def _check_external_data_files(model: onnx.ModelProto, path: str) -> None:
    """Name the first external-data file the model refers to that is not beside it."""
    directory = os.path.dirname(os.path.abspath(path))
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        data_path = os.path.join(directory, location)
        if not location or not os.path.isfile(data_path):
            raise ModelFileError(f"{path}: its weights are stored in {data_path}, which is missing "
                                 f"(copy it beside the .onnx file)")


def check_output_path(output: str, inputs: tuple[str, ...] = ()) -> None:
    """Refuse an output the write could not complete, or one that would replace an input."""
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ModelFileError(f"{output}: directory {directory} {what}")
    if os.path.isdir(output):
        raise ModelFileError(f"{output}: is a directory; give a file name to write the model to")
    if not os.access(directory, os.W_OK):
        raise ModelFileError(f"{output}: directory {directory} is not writable")
    if any(os.path.exists(path) and os.path.samefile(path, output) for path in inputs if os.path.exists(output)):
        raise ModelFileError(f"{output}: would overwrite the input model; choose another output path")


def save_model(model: onnx.ModelProto, output: str) -> None:
    """Write `model` to `output` atomically; over 2 GiB its tensors go to `<output>.data`.

    Raises ModelFileError (a bad output path) when the file system refuses the write.
    """
    try:
        _save(model, output)
    except OSError as error:
        raise ModelFileError(f"{output}: cannot write there ({error.strerror or error})") from None


def _save(model: onnx.ModelProto, output: str) -> None:
    directory = os.path.dirname(os.path.abspath(output)) or "."
    external = model.ByteSize() > _PROTOBUF_LIMIT
    data_name = os.path.basename(output) + ".data"
    with _temporary(directory, ".onnx") as model_tmp, _temporary(directory, ".data") as data_tmp:
        if external:
            model = _copy(model)  # saving as external data empties the tensors of the proto it is given
            onnx.save_model(model, model_tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=os.path.basename(data_tmp), size_threshold=_EXTERNAL_THRESHOLD)
            _point_external_data_at(model_tmp, data_name)
            os.replace(data_tmp, os.path.join(directory, data_name))
        else:
            onnx.save_model(model, model_tmp)
        os.replace(model_tmp, output)


def _point_external_data_at(model_path: str, data_name: str) -> None:
    """Rename the external-data location recorded in the just-written model file."""
    model = onnx.load(model_path, load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    onnx.save_model(model, model_path)


@contextlib.contextmanager
def atomic_path(output: str):
    """A temporary path beside `output` (same suffix) to write to; moved onto `output` only when the
    block completes, so `output` is either the complete new file or what it was before."""
    directory = os.path.dirname(os.path.abspath(output))
    with _temporary(directory, os.path.splitext(output)[1]) as path:
        yield path
        os.replace(path, output)


@contextlib.contextmanager
def _temporary(directory: str, suffix: str):
    """A file name beside the final output, removed unless it was moved into place."""
    handle, path = tempfile.mkstemp(dir=directory, prefix=".rewriter-", suffix=suffix)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # the permissions a plainly created file would get
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
