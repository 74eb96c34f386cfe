#!/usr/bin/env bash
# Regenerate ggml_patches/ from the vendor tree that scripts/build-runtime.sh unpacked.
#
#   scripts/ggml-patches.sh export [TREE]   # TREE default: .deps/llama_cpp_python-0.3.36/vendor/llama.cpp
#   scripts/ggml-patches.sh status [TREE]   # what differs from pristine upstream
#
# The vendor tree is a git repo whose tag `pristine` is the unmodified upstream source. Edit files there,
# build with scripts/build-runtime.sh (it leaves local edits alone while ggml_patches/ is unchanged), then
# run `export`: edits of upstream files become ggml_patches/patches/NNNN-<area>.patch (one per area),
# files that upstream does not have are copied to ggml_patches/<same path>.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CMD="${1:-status}"
TREE="${2:-$REPO/.deps/llama_cpp_python-0.3.36/vendor/llama.cpp}"
OUT="$REPO/ggml_patches"

git -C "$TREE" rev-parse -q --verify pristine >/dev/null || { echo "$TREE has no 'pristine' tag" >&2; exit 1; }

# area of an upstream file -> patch name
area() {
    case "$1" in
        ggml/src/ggml-cpu/*)            echo 0002-ggml-cpu-deco-moe ;;
        ggml/src/ggml-cuda/*)           echo 0005-ggml-cuda-deco-moe ;;
        ggml/*)                         echo 0001-ggml-deco-moe-op ;;
        src/*)                          echo 0003-llama-deco-arch ;;
        tests/*)                        echo 0004-tests-deco ;;
        tools/imatrix/*)                echo 0006-imatrix-deco ;;
        tools/CMakeLists.txt)           echo 0007-tools-deco-speculative ;;
        *)                              echo 0008-misc ;;
    esac
}

modified() { git -C "$TREE" diff --name-only pristine -- . ; }
added()    { git -C "$TREE" ls-files -o --exclude-standard; git -C "$TREE" diff --name-only --diff-filter=A pristine -- . ; }

case "$CMD" in
    status)
        echo "modified upstream files:"; modified | sed 's/^/  /'
        echo "new files:";               added | sort -u | sed 's/^/  /'
        ;;
    export)
        mkdir -p "$OUT/patches"
        rm -f "$OUT"/patches/*.patch
        # edits of upstream files (excluding files that are new)
        declare -A groups=()
        while IFS= read -r f; do
            git -C "$TREE" cat-file -e "pristine:$f" 2>/dev/null || continue
            a="$(area "$f")"; groups[$a]+="$f"$'\n'
        done < <(modified)
        for a in "${!groups[@]}"; do
            mapfile -t files < <(printf '%s' "${groups[$a]}")
            git -C "$TREE" diff --no-color --no-ext-diff -U3 pristine -- "${files[@]}" > "$OUT/patches/$a.patch"
            echo "wrote ggml_patches/patches/$a.patch (${#files[@]} files)"
        done
        # new files, mirrored
        while IFS= read -r f; do
            [ -n "$f" ] || continue
            mkdir -p "$OUT/$(dirname "$f")"
            cmp -s "$TREE/$f" "$OUT/$f" || { cp "$TREE/$f" "$OUT/$f"; echo "copied $f"; }
        done < <(added | sort -u)
        # the tree now is what the patch set produces: record it so build-runtime.sh keeps it as is
        SRC="$(cd "$TREE/../.." && pwd)"
        if [ -f "$SRC/.deco-unpacked" ]; then
            (cd "$OUT" && find . -type f ! -name '*.md' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum 2>/dev/null) \
                | sha256sum | cut -d' ' -f1 > "$SRC/.deco-patch-stamp"
            (cd "$TREE" && git diff pristine --binary && git ls-files -o --exclude-standard -z \
                | xargs -0 -r sha256sum) | sha256sum | cut -d' ' -f1 > "$SRC/.deco-tree-stamp"
        fi
        ;;
    *) echo "usage: $0 export|status [TREE]" >&2; exit 2 ;;
esac
