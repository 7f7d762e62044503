"""SimpleITK images <-> MRML scalar volume nodes.

SimpleITK works in LPS, MRML in RAS. Outputs lie on the input's grid by construction, so a
new output node copies the input node's IJK-to-RAS matrix exactly (after checking that
the image agrees with it), rather than recomputing it from rounded file headers.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtkmodules.util import numpy_support

from ..errors import OutputError
from ..volume_io import ijk_to_lps

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def image_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    return LPS_TO_RAS @ ijk_to_lps(image)


def array_from_volume_node(node) -> np.ndarray:
    """The node's voxels as a (z, y, x) array view (no copy)."""
    image_data = node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise OutputError(f"volume node {node.GetName()!r} has no image data")
    x, y, z = image_data.GetDimensions()
    scalars = image_data.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise OutputError(f"volume node {node.GetName()!r} has {scalars.GetNumberOfComponents()} components; "
                          "a scalar volume is needed")
    return numpy_support.vtk_to_numpy(scalars).reshape(z, y, x)


def image_from_volume_node(node) -> sitk.Image:
    """A SimpleITK copy of a volume node (its own RAS frame, ignoring any parent transform)."""
    image = sitk.GetImageFromArray(np.array(array_from_volume_node(node)))
    lps = LPS_TO_RAS @ ijk_to_ras(node)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    return image


def check_same_grid(image: sitk.Image, reference_node, what: str, tolerance_mm: float = 1e-3) -> None:
    """Refuse an image whose grid is not the reference node's (an output from another input)."""
    size = tuple(reversed(array_from_volume_node(reference_node).shape))
    if tuple(image.GetSize()) != size:
        raise OutputError(f"{what} is {image.GetSize()} voxels but {reference_node.GetName()!r} is {size}")
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    distance = np.abs(corners @ image_ijk_to_ras(image).T - corners @ ijk_to_ras(reference_node).T).max()
    if distance > tolerance_mm * max(1.0, max(size)):
        raise OutputError(f"{what} does not lie on {reference_node.GetName()!r}'s grid (corners differ by "
                          f"{distance:.3g} mm)")


def add_volume_node(scene, image: sitk.Image, name: str, reference_node, node_class: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node holding ``image`` on ``reference_node``'s grid (matrix and parent transform)."""
    check_same_grid(image, reference_node, name)
    voxels = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*reversed(voxels.shape))
    image_data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.ravel(), deep=True))
    node = scene.AddNewNodeByClass(node_class, name)
    matrix = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(image_data)
    node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    return node


def load_volume_file(scene, path: str, name: str):
    """A volume file as Slicer's Add Data loads it: a scalar volume node with its storage and display
    nodes and a subject-hierarchy item (which Slicer's plugins would add). The file is read by MRML's
    own reader; check it with ``volume_io.read_volume`` first for one-line errors on bad input."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise OutputError(f"MRML could not read {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    subject_hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if subject_hierarchy is not None and not subject_hierarchy.GetItemByDataNode(node):
        subject_hierarchy.CreateItem(subject_hierarchy.GetSceneItemID(), node)
    return node
