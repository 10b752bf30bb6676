"""The integration test bed: private containerd instances, test images, leak checks.

Installed by tests/bed/setup.sh; see containerd.py and images.py.
"""
