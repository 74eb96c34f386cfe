#!/usr/bin/env bash
# ggml_patches/ <-> the vendor llama.cpp tree that scripts/build-runtime.sh unpacked (ggml_patches/README.md).
#
#   scripts/ggml-patches.sh status   [TREE]   # the patch commits and the edits not committed yet
#   scripts/ggml-patches.sh export   [TREE]   # ggml_patches/ := one patch per commit + the new files
#   scripts/ggml-patches.sh apply    [TREE]   # TREE := pristine + one commit per patch + the new files
#   scripts/ggml-patches.sh pristine [TREE]   # TREE := pristine (build-runtime.sh --no-patch)
#
# TREE (default .deps/llama_cpp_python-0.3.36/vendor/llama.cpp) is a git repo whose tag `pristine` is the
# unmodified upstream source. `apply` commits each ggml_patches/patches/NNNN-<topic>.patch on top of it, in sorted
# order, with the patch's name as the subject, then the new files (ggml_patches/<path>, plain copies) as one last
# commit. Edit the tree, commit each edit of an upstream file into the commit of its topic (git commit
# --fixup=<commit>, git rebase -i --autosquash pristine; a new topic is a new commit named NNNN-<topic>), then
# `export`: every commit's edits of upstream files become the patch named by its subject, and every file
# upstream does not have is copied to ggml_patches/<same path>. build-runtime.sh runs `apply` / `pristine`
# when ggml_patches/ changed, and stops instead if the tree holds commits or edits not exported yet
# (DECO_FORCE_REPATCH=1 discards them).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CMD="${1:-status}"
TREE="${2:-$REPO/.deps/llama_cpp_python-0.3.36/vendor/llama.cpp}"
OUT="$REPO/ggml_patches"
SRC="$(cd "$TREE/../.." && pwd)"   # the unpacked sdist: the stamps of what the tree holds live there

git -C "$TREE" rev-parse -q --verify pristine >/dev/null || { echo "$TREE has no 'pristine' tag" >&2; exit 1; }
tgit() { git -C "$TREE" "$@"; }

# what the tree should hold: a hash of ggml_patches/, or "pristine"
patch_stamp() {
    if [ "$1" = pristine ]; then echo pristine; return; fi
    (cd "$OUT" && find . -type f ! -name '*.md' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) \
        | sha256sum | cut -d' ' -f1
}
# what the tree holds: its files and commits relative to pristine
tree_stamp() {
    (cd "$TREE" && git diff pristine --binary && git ls-files -o --exclude-standard -z | xargs -0 -r sha256sum \
        && git rev-list pristine..HEAD) | sha256sum | cut -d' ' -f1
}
record_stamps() {
    patch_stamp "$1" > "$SRC/.deco-patch-stamp"
    tree_stamp > "$SRC/.deco-tree-stamp"
}

# file lists of the tree, as far as upstream has the files
upstream() { tgit cat-file -e "pristine:$1" 2>/dev/null; }
upstream_only() { local f; while IFS= read -r f; do if upstream "$f"; then echo "$f"; fi; done; }
uncommitted_upstream_edits() { tgit diff --name-only HEAD -- . | upstream_only; }
upstream_files_of() { tgit diff --name-only "$1^" "$1" -- . | upstream_only; }   # edited by commit $1
new_files() {   # files upstream does not have, committed or not
    { tgit ls-files -o --exclude-standard; tgit diff --name-only --diff-filter=A pristine -- .; } | sort -u
}
patch_commits() { tgit rev-list --reverse pristine..HEAD; }

# TREE := pristine, plus the patch set when $1 = apply; nothing done when it already holds that
checkout() {
    local want; want="$(patch_stamp "$1")"
    [ "$want" != "$(cat "$SRC/.deco-patch-stamp" 2>/dev/null || true)" ] || return 0
    if [ -f "$SRC/.deco-tree-stamp" ] && [ "$(tree_stamp)" != "$(cat "$SRC/.deco-tree-stamp")" ] \
       && [ -z "${DECO_FORCE_REPATCH:-}" ]; then
        echo "vendor tree $TREE has commits or edits not in ggml_patches/ and the patch set changed." >&2
        echo "Export them first (scripts/ggml-patches.sh export) or rerun with DECO_FORCE_REPATCH=1." >&2
        exit 1
    fi
    echo "[ggml-patches] $TREE := $( [ "$1" = apply ] && echo "pristine + ggml_patches" || echo pristine )" >&2
    local cgit=(git -C "$TREE" -c user.name=deco -c user.email=deco@localhost -c commit.gpgsign=false
                commit -q --no-verify)
    # back to pristine, rewriting only the files that differ (keeps mtimes => incremental builds)
    tgit checkout -q -f -B deco pristine
    tgit clean -q -fd
    if [ "$1" = apply ]; then
        local p f rel
        while IFS= read -r -d '' p; do
            tgit apply --index --whitespace=nowarn "$p" || { echo "patch failed: $p" >&2; exit 1; }
            "${cgit[@]}" -m "$(basename "$p" .patch)"
        done < <(find "$OUT/patches" -name '*.patch' -print0 | LC_ALL=C sort -z)
        while IFS= read -r -d '' f; do
            rel="${f#"$OUT"/}"
            mkdir -p "$TREE/$(dirname "$rel")"
            cp "$f" "$TREE/$rel"
            tgit add -f -- "$rel"
        done < <(find "$OUT" -type f ! -path "$OUT/patches/*" ! -name '*.md' -print0)
        "${cgit[@]}" -m "new files of ggml_patches/"
    fi
    record_stamps "$1"
}

case "$CMD" in
    apply|pristine)
        checkout "$CMD"
        ;;
    status)
        echo "patch commits (pristine..HEAD):"
        for c in $(patch_commits); do
            echo "  $(tgit log -1 --format='%h %s' "$c")"
            upstream_files_of "$c" | sed 's/^/      /'
        done
        echo "uncommitted edits of upstream files:"; uncommitted_upstream_edits | sed 's/^/  /'
        echo "new files:"; new_files | sed 's/^/  /'
        ;;
    export)
        pending="$(uncommitted_upstream_edits)"
        if [ -n "$pending" ]; then
            echo "edits of upstream files not committed yet (commit each into its patch's commit first):" >&2
            echo "$pending" | sed 's/^/  /' >&2
            exit 1
        fi
        [ -z "$(tgit rev-list --min-parents=2 pristine..HEAD)" ] \
            || { echo "pristine..HEAD has merge commits: make it a straight line of patch commits" >&2; exit 1; }
        # one patch per commit that edits upstream files, named by the commit's subject
        staging="$(mktemp -d)"
        trap 'rm -rf "$staging"' EXIT
        prev=""
        for c in $(patch_commits); do
            mapfile -t files < <(upstream_files_of "$c")
            [ "${#files[@]}" -gt 0 ] || continue
            name="$(tgit log -1 --format=%s "$c")"
            [[ "$name" =~ ^[0-9]{4}-[A-Za-z0-9_.-]+$ ]] \
                || { echo "commit $(tgit rev-parse --short "$c") edits upstream files; its subject '$name' is not a patch name NNNN-<topic>" >&2; exit 1; }
            [[ -z "$prev" || "$prev" < "$name" ]] \
                || { echo "patch commits out of order: $name after $prev (they are applied in sorted order)" >&2; exit 1; }
            prev="$name"
            tgit diff --no-color --no-ext-diff -U3 "$c^" "$c" -- "${files[@]}" > "$staging/$name.patch"
            echo "wrote ggml_patches/patches/$name.patch (${#files[@]} files)"
        done
        mkdir -p "$OUT/patches"
        rm -f "$OUT"/patches/*.patch
        find "$staging" -name '*.patch' -exec cp -t "$OUT/patches/" {} +
        # new files, mirrored
        while IFS= read -r f; do
            mkdir -p "$OUT/$(dirname "$f")"
            cmp -s "$TREE/$f" "$OUT/$f" || { cp "$TREE/$f" "$OUT/$f"; echo "copied $f"; }
        done < <(new_files)
        # the tree now is what the patch set produces: recorded, so that build-runtime.sh keeps it as it is
        [ ! -f "$SRC/.deco-unpacked" ] || record_stamps apply
        ;;
    *) echo "usage: $0 status|export|apply|pristine [TREE]" >&2; exit 2 ;;
esac
