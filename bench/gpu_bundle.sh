#!/bin/bash
# Gathers this machine's CRIU and the shared libraries it needs (all but glibc's)
# into one folder, for a GPU machine that has no CRIU:
#     bash bench/gpu_bundle.sh .gpu
# gives .gpu/criu (a wrapper that points the loader at .gpu/lib for CRIU alone),
# .gpu/criu.bin and .gpu/lib/, and .gpu/plugins/cuda_plugin.so when
# $STASIS_CRIU_CUDA_PLUGIN names a build of CRIU's cuda_plugin (`make cuda_plugin`
# in CRIU's source tree; the reference the check compares with).
# bench/gpu_device.sh runs the GPU check with it.
set -euo pipefail
dest=${1:?usage: gpu_bundle.sh DIR}
criu=$(command -v "${STASIS_CRIU:-criu}")
rm -rf "$dest"
mkdir -p "$dest/lib"
cp "$criu" "$dest/criu.bin"
ldd "$criu" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | while read -r lib; do
    case $(basename "$lib") in
        libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*) ;;
        *) cp -L "$lib" "$dest/lib/" ;;
    esac
done
cat > "$dest/criu" <<'WRAP'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/criu.bin" "$@"
WRAP
chmod +x "$dest/criu"
if [ -n "${STASIS_CRIU_CUDA_PLUGIN:-}" ]; then
    mkdir -p "$dest/plugins"
    cp "$STASIS_CRIU_CUDA_PLUGIN" "$dest/plugins/cuda_plugin.so"
fi
"$dest/criu" --version
du -sh "$dest"
