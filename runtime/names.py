"""The names Stasis's parts share: annotation keys, socket paths, file names.

Standard library only and cheap to import: the shim's start path reads it too.
"""

from __future__ import annotations

import os

# The annotation naming a checkpoint to restore a container (or, on a pod, its
# containers) from.
RESTORE_ANNOTATION = "stasis.dev/restore-from"
# A pod's restore policy, and the signed grant `stasis kube restore` gives a pod.
RESTORE_POLICY = "stasis.dev/restore-policy"
RESTORE_GRANT = "stasis.dev/restore-grant"
# Files of a checkpoint: the restore metadata, and the pod record that makes a
# checkpoint a pod checkpoint (with the most it may hold).
METADATA_FILE = "stasis.json"
POD_FILE = "pod.json"
POD_FILE_MAX = 4 << 20
# The ttrpc metadata key that carries containerd's namespace.
TTRPC_NAMESPACE_KEY = "containerd-namespace-ttrpc"
# The annotations that group containers onto one shim, as containerd's runc shim does:
# its own group annotation, then CRI's sandbox id.
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
# The runtime type containerd knows Stasis by.
RUNTIME = "io.containerd.stasis.v2"
# Where shim sockets live (containerd's directory for them).
SOCKET_DIR = "/run/containerd/s"
# Where S3 checkpoints are spooled before their upload, and the file a spool gets once
# its commit starts (what `stasis push` uploads again).
SPOOL_DIR = "/var/lib/stasis/spool"
SPOOL_PENDING = ".stasis-pending.json"
VERSION = "0.1.0"


def socket_key(containerd_address: str, namespace: str, group: str) -> bytes:
    """What a group's shim socket is named after (hashed: ``socket_path``)."""
    key = os.path.normpath(os.path.join("/", containerd_address, namespace, group))
    return f"stasis:{key}".encode()


def socket_path(containerd_address: str, namespace: str, group: str) -> str:
    """The shim socket for a group; distinct from the runc shim's for the same group."""
    import hashlib

    digest = hashlib.sha256(socket_key(containerd_address, namespace, group)).hexdigest()
    return os.path.join(SOCKET_DIR, digest)
