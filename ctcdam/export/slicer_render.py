"""A review bundle opened and drawn by 3D Slicer's own libraries (PyPI ``slicer-core``), headless.

``SlicerSession`` builds what the Slicer desktop application builds before it opens a scene (application
logic, the Colors, Volumes, Segmentations, Markups, Subject Hierarchy and Tables logics, and the Red, Yellow and Green
slice views with Slicer's slice logic and its 2D displayable managers), then opens a ``.mrb`` the way Slicer
does (``vtkMRMLApplicationLogic.OpenSlicerDataBundle``, or ``vtkMRMLScene.ReadFromMRB`` as the desktop's
scene-bundle reader) and renders each view offscreen through EGL. Nothing is moved after the scene is
opened, so a rendering shows the views exactly as the scene opens them (research/slicer_core.md).

``write_views_png`` renders the three views into ``views.png``; ``write_views_png_isolated`` does it in a
child process (``python -m ctcdam.export.slicer_render``) so that a crash in native code or a missing EGL
library costs the caller one log line and no bundle; ``start_views_png_isolated`` starts the child and lets
the caller work until it waits for it (``ctcdam.export.views_renderer`` keeps one such child for a whole
cohort run). ``slicer-core`` is optional: nothing here is imported at module import time.
"""
from __future__ import annotations

import ctypes.util
import glob
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from ctcdam import io
from ctcdam.export.scene import SLICE_VIEWS, VIEW_ORIENTATIONS

log = logging.getLogger(__name__)

#: Pixels of each rendered view (a view keeps the scene's field of view whatever its pixel size).
VIEW_DIMENSIONS = (512, 512)
#: Debian packages that provide Mesa's EGL (offscreen OpenGL without a display).
EGL_PACKAGES = ("libegl1", "libegl-mesa0", "libgl1-mesa-dri")
#: Where Mesa's software rasteriser (``libgl1-mesa-dri``) lives on common Linux systems.
_DRI_PATTERNS = ("/usr/lib/*/dri/swrast_dri.so", "/usr/lib64/dri/swrast_dri.so", "/usr/lib/dri/swrast_dri.so",
                 "/usr/local/lib/dri/swrast_dri.so", "/usr/local/lib/*/dri/swrast_dri.so")
#: zlib level of views.png: the same pixels as the default level 6 in half the time, 20 % more bytes (as the report).
VIEWS_PNG_COMPRESS_LEVEL = 3
#: The PNG text key that carries the caption of views.png (so a reader can rebuild the image exactly).
CAPTION_KEY = "Description"
#: Module logics the desktop registers that a review scene needs (names as Slicer's module names).
_MODULE_LOGICS = {
    "Volumes": "vtkSlicerVolumesLogic",
    "Segmentations": "vtkSlicerSegmentationsModuleLogic",
    "Markups": "vtkSlicerMarkupsLogic",
    "SubjectHierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
    "Tables": "vtkSlicerTablesLogic",
}
_DISPLAYABLE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLMarkupsDisplayableManager")
_VIEW_TITLES = {view: f"{view} ({VIEW_ORIENTATIONS[view].lower()})" for view in SLICE_VIEWS}


class SlicerUnavailable(RuntimeError):
    """slicer-core is not installed, or offscreen rendering (Mesa EGL) is missing; the message says which."""


class SlicerLoadError(RuntimeError):
    """Slicer could not open a scene bundle; the message carries Slicer's own messages."""


def slicer_available() -> bool:
    """Whether 3D Slicer's libraries (``slicer-core`` and its ``vtk``) are installed."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("slicer_core", "vtkmodules"))
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken package
        return False


def rendering_problem() -> str | None:
    """None when slicer-core can render offscreen here; otherwise one sentence naming what to install."""
    if not slicer_available():
        return "3D Slicer's libraries are not installed (pip install slicer-core, or the project's dev extra)"
    drivers = [os.path.join(d, "swrast_dri.so") for d in os.environ.get("LIBGL_DRIVERS_PATH", "").split(":") if d]
    has_dri = any(os.path.exists(p) for p in drivers) or any(glob.glob(p) for p in _DRI_PATTERNS)
    if ctypes.util.find_library("EGL") is None or ctypes.util.find_library("EGL_mesa") is None or not has_dri:
        return ("offscreen rendering needs Mesa's EGL, which is missing: install the Debian packages "
                + " ".join(EGL_PACKAGES))
    return None


def _prepare_environment() -> None:
    # VTK's wheel picks its OpenGL window class at run time; EGL renders without an X display.
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


class _SliceView:
    """One slice view as the desktop builds it: slice logic, renderer and window, 2D displayable managers."""

    def __init__(self, slicer: Any, vtk: Any, app: Any, factory: Any, scene: Any, name: str, size: tuple[int, int]):
        self.name, self.size = name, size
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app)
        self.logic.SetMRMLScene(scene)
        app.GetSliceLogics().AddItem(self.logic)
        node = self.logic.AddSliceNode(name)
        # Without Slicer's layout logic new slice nodes come up as "Reformat" (pitfall 5 of slicer_core.md).
        node.SetDefaultOrientation(VIEW_ORIENTATIONS[name])
        node.SetOrientationToDefault()
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetMultiSamples(0)
        self.window.SetSize(*size)
        self.window.AddRenderer(self.renderer)
        # The markups displayable manager needs an interactor; the generic one needs no display.
        self.interactor = vtk.vtkGenericRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()
        # What CTK's vtkLightBoxRendererManager does in the desktop for a 1x1 light box: the slice logic's
        # blended layers as one 2D image behind everything else.
        self.mapper = vtk.vtkImageMapper()
        self.mapper.SetColorWindow(255.0)
        self.mapper.SetColorLevel(127.5)
        self.actor = vtk.vtkActor2D()
        self.actor.SetMapper(self.mapper)
        self.actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.actor)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)
        self.managers.SetMRMLDisplayableNode(node)

    @property
    def node(self) -> Any:
        return self.logic.GetSliceNode()

    def render(self, vtk: Any, numpy_support: Any) -> np.ndarray:
        """(rows, columns, 3) uint8 RGB of the view, top row first."""
        self.logic.ResizeSliceNode(*self.size)  # what the view widget does when it is shown
        self.mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.managers.RequestRender()
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        width, height = self.size
        pixels = numpy_support.vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars()).reshape(height, width, 3)
        return np.ascontiguousarray(pixels[::-1])  # VTK's first row is the bottom one

    def close(self) -> None:
        self.managers.SetMRMLDisplayableNode(None)
        self.mapper.SetInputConnection(None)
        self.window.Finalize()


class SlicerSession:
    """A headless Slicer application: open a review bundle, inspect its nodes, render its slice views.

    Use as a context manager; on exit every logic is detached from the scene before the scene is cleared
    (freeing them in another order crashes VTK; research/slicer_core.md pitfall 3).
    """

    def __init__(self, view_size: tuple[int, int] = VIEW_DIMENSIONS):
        self.view_size = (int(view_size[0]), int(view_size[1]))
        self._views: dict[str, _SliceView] = {}
        self._logics: dict[str, Any] = {}
        self._messages: list[str] = []

    def __enter__(self) -> Self:
        problem = rendering_problem()
        if problem:
            raise SlicerUnavailable(problem)
        _prepare_environment()
        import slicer
        import vtk
        from vtkmodules.util import numpy_support

        self.slicer, self.vtk, self._numpy_support = slicer, vtk, numpy_support
        # Slicer's and VTK's warnings go to a string window read by ``messages``, not to stderr twice.
        self._output = vtk.vtkStringOutputWindow()
        vtk.vtkOutputWindow.SetInstance(self._output)
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
        self.scene = slicer.vtkMRMLScene()
        crosshair = slicer.vtkMRMLCrosshairNode()  # as qSlicerCoreApplication::setMRMLScene adds one
        crosshair.SetCrosshairName("default")
        self.scene.AddNode(crosshair)
        self.app = slicer.vtkSlicerApplicationLogic()
        self.app.SetMRMLScene(self.scene)
        self.app.GetColorLogic().SetMRMLScene(self.scene)
        self.app.GetColorLogic().AddDefaultColorNodes()
        self.app.SetSliceLogics(vtk.vtkCollection())
        self.app.SetViewLogics(vtk.vtkCollection())
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)
        self.factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        self.factory.SetMRMLApplicationLogic(self.app)
        for manager in _DISPLAYABLE_MANAGERS:
            if not self.factory.IsDisplayableManagerRegistered(manager):
                self.factory.RegisterDisplayableManager(manager)
        for name, class_name in _MODULE_LOGICS.items():
            logic = getattr(slicer, class_name)()
            # Application logic before scene (pitfall 2); the app keeps a plain pointer, so keep the object.
            logic.SetMRMLApplicationLogic(self.app)
            logic.SetMRMLScene(self.scene)
            self.app.SetModuleLogic(name, logic)
            self._logics[name] = logic
        for view in SLICE_VIEWS:
            self._views[view] = _SliceView(slicer, vtk, self.app, self.factory, self.scene, view, self.view_size)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for view in self._views.values():
            view.close()
        for view in self._views.values():
            view.logic.SetMRMLScene(None)
        for name, logic in self._logics.items():
            self.app.SetModuleLogic(name, None)
            logic.SetMRMLScene(None)
        if getattr(self, "_remote", None) is not None:
            self._io_logic.SetMRMLScene(None)
            self._remote.SetMRMLScene(None)
        self.scene.Clear(1)
        self.app.GetColorLogic().SetMRMLScene(None)
        self.app.SetMRMLScene(None)
        self._views.clear()
        self._logics.clear()

    # -- opening -------------------------------------------------------------------------------------------

    def _collected(self, messages: Any) -> list[str]:
        texts = [messages.GetNthMessageText(i) for i in range(messages.GetNumberOfMessages())]
        self._messages += texts
        return texts

    def open_scene(self, mrml: Path) -> None:
        """Open a ``.mrml`` scene in place, as Slicer's scene reader does (``SetURL`` + ``Connect``)."""
        self.scene.SetURL(str(Path(mrml).resolve()))
        if not self.scene.Connect():
            raise SlicerLoadError(f"Slicer could not open the scene {mrml}: " + "; ".join(self.messages()[-3:]))

    def open_bundle(self, mrb: Path, unpack_dir: Path) -> None:
        """Open a ``.mrb`` with ``vtkMRMLApplicationLogic.OpenSlicerDataBundle`` (files stay in ``unpack_dir``)."""
        unpack_dir = Path(unpack_dir).resolve()
        unpack_dir.mkdir(parents=True, exist_ok=True)
        messages = self.slicer.vtkMRMLMessageCollection()
        # vtkArchive needs absolute paths (pitfall 4).
        if not self.app.OpenSlicerDataBundle(str(Path(mrb).resolve()), str(unpack_dir), messages):
            raise SlicerLoadError(f"Slicer could not open {mrb}: " + "; ".join(self._collected(messages)))
        self._collected(messages)

    def read_bundle(self, mrb: Path, cache_dir: Path) -> None:
        """Open a ``.mrb`` with ``vtkMRMLScene.ReadFromMRB``, as the desktop's scene-bundle reader does."""
        slicer = self.slicer
        if getattr(self, "_remote", None) is None:
            # ReadFromMRB goes through the scene's data IO manager, which needs a cache folder.
            self._remote = slicer.vtkMRMLRemoteIOLogic()
            self._remote.SetMRMLScene(self.scene)
            self._remote.SetMRMLApplicationLogic(self.app)
            self._remote.GetCacheManager().SetRemoteCacheDirectory(str(Path(cache_dir).resolve()))
            self._io_logic = slicer.vtkDataIOManagerLogic()
            self._io_logic.SetMRMLScene(self.scene)
            self._io_logic.SetMRMLApplicationLogic(self.app)
            self._io_logic.SetAndObserveDataIOManager(self._remote.GetDataIOManager())
            self._remote.AddDataIOToScene()
        messages = slicer.vtkMRMLMessageCollection()
        if not self.scene.ReadFromMRB(str(Path(mrb).resolve()), True, messages):
            raise SlicerLoadError(f"Slicer could not read {mrb}: " + "; ".join(self._collected(messages)))
        self._collected(messages)

    def messages(self) -> list[str]:
        """Slicer's load messages and everything VTK/Slicer logged so far."""
        logged = [line for line in self._output.GetOutput().splitlines() if line.strip()]
        return [*self._messages, *logged]

    def scene_xml(self) -> str:
        """The scene as Slicer itself would save it (its own XML writer), after what it read."""
        self.scene.SetSaveToXMLString(1)
        self.scene.Commit()
        return self.scene.GetSceneXMLString()

    # -- views ---------------------------------------------------------------------------------------------

    def slice_logic(self, view: str) -> Any:
        """The ``vtkMRMLSliceLogic`` of a view (Red, Yellow, Green)."""
        return self._views[view].logic

    def slice_node(self, view: str) -> Any:
        """The ``vtkMRMLSliceNode`` of a view."""
        return self._views[view].node

    def render(self, view: str) -> np.ndarray:
        """The view as Slicer draws it now: (rows, columns, 3) uint8 RGB, top row first."""
        return self._views[view].render(self.vtk, self._numpy_support)

    def render_all(self) -> dict[str, np.ndarray]:
        """Every view, by name."""
        return {view: self.render(view) for view in SLICE_VIEWS}


def compose_views(images: Mapping[str, np.ndarray], caption: str = "") -> np.ndarray:
    """The views side by side on a dark strip with each view's name above it; the views' pixels are unchanged."""
    from PIL import Image, ImageDraw

    gap, header = 6, 22 + (18 if caption else 0)
    height = max(image.shape[0] for image in images.values())
    width = sum(image.shape[1] for image in images.values()) + gap * (len(images) + 1)
    canvas = Image.new("RGB", (width, height + header + gap), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    if caption:
        draw.text((gap, 4), caption, fill=(235, 235, 235))
    x = gap
    for view, image in images.items():
        draw.text((x, header - 16), _VIEW_TITLES.get(view, view), fill=(235, 235, 235))
        canvas.paste(Image.fromarray(image), (x, header))
        x += image.shape[1] + gap
    return np.asarray(canvas)


def render_bundle_views(mrb: Path, view_size: tuple[int, int] = VIEW_DIMENSIONS) -> dict[str, np.ndarray]:
    """The three slice views of a ``.mrb`` (or a ``.mrml`` scene) as the scene opens them."""
    with tempfile.TemporaryDirectory(prefix="ctcdam-slicer-") as unpack, SlicerSession(view_size) as session:
        if Path(mrb).suffix == ".mrml":
            session.open_scene(Path(mrb))
        else:
            session.open_bundle(Path(mrb), Path(unpack))
        return session.render_all()


def write_views_png(mrb: Path, path: Path, caption: str = "") -> Path:
    """Render the three slice views of a ``.mrb`` (or ``.mrml``) as the scene opens and write them side by side as
    a PNG (the caption also goes into the PNG's text chunk ``CAPTION_KEY``)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    composed = compose_views(render_bundle_views(Path(mrb)), caption)
    info = PngInfo()
    info.add_text(CAPTION_KEY, caption)
    with io.atomic_file(path) as temporary:
        Image.fromarray(composed).save(temporary, format="PNG", pnginfo=info, compress_level=VIEWS_PNG_COMPRESS_LEVEL)
    return Path(path)


def start_views_png_isolated(mrb: Path, path: Path, caption: str = "",
                             timeout_s: float = 180.0) -> Callable[[], Path | None]:
    """Start ``write_views_png`` in a child process and return the call that waits for it and publishes ``path``
    (None, with one log line saying why, when the views cannot be made); the caller works meanwhile."""
    problem = rendering_problem()
    if problem:
        log.info("views.png skipped: %s", problem)
        return lambda: None
    # The child renders into a scratch folder and this process publishes the PNG, so the bundle's writes (and
    # their fault-injection points, which the child does not inherit) all happen in the process that owns them.
    scratch = tempfile.TemporaryDirectory(prefix="ctcdam-views-")
    rendered, messages = Path(scratch.name) / "views.png", Path(scratch.name) / "stderr.txt"
    command = [sys.executable, "-m", "ctcdam.export.slicer_render", str(Path(mrb).resolve()), str(rendered)]
    if caption:
        command += ["--caption", caption]
    with open(messages, "w") as stderr:  # a file, not a pipe: a chatty child never blocks on a full pipe
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                 env=child_environment())

    def finish() -> Path | None:
        try:
            try:
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                log.warning("views.png skipped: Slicer's rendering took more than %.0f s", timeout_s)
                return None
            if child.returncode != 0 or not rendered.is_file():
                lines = messages.read_text(errors="replace").strip().splitlines()
                log.warning("views.png skipped: Slicer's rendering failed (%s)",
                            (lines or [f"exit status {child.returncode}"])[-1])
                return None
            return io.write_bytes(path, rendered.read_bytes())
        finally:
            scratch.cleanup()

    return finish


def write_views_png_isolated(mrb: Path, path: Path, caption: str = "", timeout_s: float = 180.0) -> Path | None:
    """``write_views_png`` in a child process; None (with one log line saying why) when it cannot be made."""
    return start_views_png_isolated(mrb, path, caption, timeout_s)()


def child_environment() -> dict[str, str]:
    """The environment of a rendering child: EGL for VTK, and no fault injection (the child's writes are scratch;
    the parent publishes the PNG)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTCDAM_FAULT")}
    return {**env, "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ctcdam.export.slicer_render BUNDLE.mrb OUT.png [--caption TEXT]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mrb", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--caption", default="")
    args = parser.parse_args(argv)
    try:
        write_views_png(args.mrb, args.png, args.caption)
    except (SlicerUnavailable, SlicerLoadError) as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from ctcdam.cli.common import exit_process

    exit_process(main())
