#!/usr/bin/env python3
"""train_gather_text.py — collect English prose from Debian-packaged documentation on THIS machine.

Sources (all installed by Debian packages, all offline): README / *.txt files under /usr/share/doc (gzipped or
not), git's release notes and technical docs, and the docstrings of Python's standard library. Paragraphs are
cleaned (whitespace collapsed, mostly-letters filter, no code-looking lines), de-duplicated, and written one per
line to the output file. Used by scripts/train-tiny-model; the result is git-ignored and carried to the GPU
machine with the `run` tool's `carry`.

usage: train_gather_text.py OUT.txt [MAX_MB]
"""
import ast
import gzip
import os
import re
import sys

OUT = sys.argv[1]
MAX_BYTES = int(float(sys.argv[2] if len(sys.argv) > 2 else 4) * 1e6)


def read(path):
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read(2_000_000).decode("utf-8", "replace")
        with open(path, "rb") as f:
            return f.read(2_000_000).decode("utf-8", "replace")
    except OSError:
        return ""


def paragraphs(text):
    for para in re.split(r"\n\s*\n", text):
        lines = [l.strip() for l in para.splitlines()]
        if any(re.search(r"[{};=<>\\$]|^\s*[-*#|+]{2,}|http|www\.|@", l) for l in lines):
            continue
        p = " ".join(l for l in lines if l)
        p = re.sub(r"\s+", " ", p).strip()
        if len(p) < 80 or len(p) > 2000:
            continue
        letters = sum(c.isalpha() or c == " " for c in p)
        if letters < 0.85 * len(p) or not p[0].isupper() or p[-1] not in ".!?":
            continue
        if not all(ord(c) < 128 for c in p):
            continue
        yield p


def doc_files():
    for root, _, files in os.walk("/usr/share/doc"):
        for fn in files:
            low = fn.lower()
            if "copyright" in low or "changelog" in low:
                continue
            if low.startswith("readme") or low.endswith((".txt", ".txt.gz", ".md", ".md.gz")) or "/git/" in root:
                yield os.path.join(root, fn)


def docstrings():
    base = "/usr/lib/python3.11"
    for root, _, files in os.walk(base):
        if "site-packages" in root or "dist-packages" in root or "test" in root:
            continue
        for fn in files:
            if not fn.endswith(".py"):
                continue
            try:
                tree = ast.parse(read(os.path.join(root, fn)))
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                    d = ast.get_docstring(node)
                    if d:
                        yield d


def main():
    seen, total = set(), 0
    with open(OUT, "w") as out:
        for text in (read(p) for p in sorted(doc_files())):
            for p in paragraphs(text):
                if p in seen:
                    continue
                seen.add(p)
                out.write(p + "\n")
                total += len(p) + 1
            if total > MAX_BYTES * 0.7:
                break
        for d in docstrings():
            for p in paragraphs(d):
                if p in seen:
                    continue
                seen.add(p)
                out.write(p + "\n")
                total += len(p) + 1
            if total > MAX_BYTES:
                break
    print(f"{OUT}: {len(seen)} paragraphs, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
