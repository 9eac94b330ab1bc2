"""Render-only mesh simplification: fewer triangles for the CPU rasterizer, same physics.

Why: on a machine without a GPU, MuJoCo renders through Mesa's llvmpipe, and a frame of
the ALOHA scenes costs what its 60,568 triangles cost (vertex lighting and triangle setup;
rendering at 60x80 instead of 240x320 saves little, hiding every mesh leaves 0.06 ms). The
two ViperX gripper meshes alone hold 33,000 of them and cover about 700 pixels of a
240x320 frame. A temporally ensembled policy needs a new frame at every step, so this
triangle count sets the speed of its evaluation.

How: vertex clustering. Every vertex is snapped to the cell of a grid (``cell`` metres, in
the mesh's own frame) it falls in; a cell's vertices merge into the first of them (its
position, normal and texture coordinate are kept as they were); triangles whose corners
merged are dropped, and so are repeated ones. Only faces are rewritten: no vertex moves, so
the kept surface is exactly the original one, and nothing downstream (normals, the convex
hull, the mesh's frame) needs recomputing.

Only a *render* model is simplified (``simplify_render_meshes`` on a copy of the model):
the physics, contacts and rewards always use the full meshes. The frames change a little
(see BENCHMARKS.md, "Evaluation speed"), which is why ``sim.render_mesh_mm`` is a declared
setting that recording, training and evaluation share.
"""

from __future__ import annotations

import numpy as np


def cluster_faces(verts: np.ndarray, faces: np.ndarray, cell: float) -> np.ndarray:
    """The faces (m, 3) of a mesh after vertex clustering on a grid of ``cell`` (m <= n).

    verts: (V, 3) positions; faces: (n, 3) vertex indices. A kept face's corners are the
    first vertex (lowest index) of their grid cells; its winding is kept; degenerate and
    repeated faces are dropped; the survivors keep their original order.
    """
    if cell <= 0:
        return faces.copy()
    keys = np.floor(np.asarray(verts, dtype=np.float64) / cell).astype(np.int64)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    rep = first[inverse.reshape(-1)]
    f = rep[faces]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    if not len(f):
        return f
    # A face and its rotations are one face (same corners, same winding): keep the first.
    r = np.argmin(f, axis=1)
    rows = np.arange(len(f))
    canon = np.stack([f[rows, (r + k) % 3] for k in range(3)], axis=1)
    _, keep = np.unique(canon, axis=0, return_index=True)
    return f[np.sort(keep)]


def _corner_map(corners: np.ndarray, per_corner: np.ndarray, size: int) -> np.ndarray:
    """vertex -> the per-corner index (normal or texcoord) one of its corners used."""
    out = np.zeros(size, dtype=per_corner.dtype)
    out[corners.reshape(-1)] = per_corner.reshape(-1)
    return out


def simplify_render_meshes(model, cell: float) -> tuple[int, int]:
    """Simplify every mesh of a MuJoCo model in place (``mujoco.MjModel``, render-only use).

    Must run before the model's first render: the rendering context uploads the meshes
    when it is created. Returns (faces before, faces after), summed over meshes.
    """
    before = int(model.mesh_facenum.sum())
    for i in range(model.nmesh):
        va, vn = int(model.mesh_vertadr[i]), int(model.mesh_vertnum[i])
        fa, fn = int(model.mesh_faceadr[i]), int(model.mesh_facenum[i])
        faces = model.mesh_face[fa:fa + fn].copy()
        kept = cluster_faces(model.mesh_vert[va:va + vn], faces, cell)
        n = len(kept)
        normal = _corner_map(faces, model.mesh_facenormal[fa:fa + fn], vn)
        model.mesh_facenormal[fa:fa + n] = normal[kept]
        if model.mesh_texcoordadr[i] >= 0:
            tex = _corner_map(faces, model.mesh_facetexcoord[fa:fa + fn], vn)
            model.mesh_facetexcoord[fa:fa + n] = tex[kept]
        model.mesh_face[fa:fa + n] = kept
        model.mesh_facenum[i] = n
    return before, int(model.mesh_facenum.sum())
