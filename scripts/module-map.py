#!/usr/bin/env python3
"""The crate's module map from its sources: for each area (a top-level
module of the library, or the binary), its files and lines, and which other
areas it imports (`crate::x` / `keyward::x` paths). Cycles between areas are
listed at the end; docs/architecture.md's map is this script's output.

usage: scripts/module-map.py [SRC_DIR]   (default: src)
"""
import os, re, sys
from collections import defaultdict

src = sys.argv[1] if len(sys.argv) > 1 else "src"
BIN_ROOTS = {"main.rs", "cli"}
files = defaultdict(list)
lines = defaultdict(int)
imports = defaultdict(set)
code_of = {}

def area_of(rel):
    head = rel.split("/")[0]
    if head in BIN_ROOTS:
        return "(binary)"
    return head[:-3] if head.endswith(".rs") else head

path_re = re.compile(r"\b(?:crate|keyward)::([a-z_][a-z0-9_]*)")
group_re = re.compile(r"\b(?:crate|keyward)::\{([^}]*)\}", re.S)
for root, _, names in os.walk(src):
    for name in names:
        if not name.endswith(".rs"):
            continue
        full = os.path.join(root, name)
        rel = os.path.relpath(full, src)
        area = area_of(rel)
        if area == "lib":
            continue
        text = open(full).read()
        # Tests may reach anywhere; the map is of the code that ships.
        shipped = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
        # Comments name modules too; only code is an import.
        shipped = re.sub(r"//.*", "", shipped)
        code_of[rel] = shipped
        files[area].append(rel)
        lines[area] += text.count("\n")
        found = set(path_re.findall(shipped))
        for group in group_re.findall(shipped):
            found |= {g.strip().split("::")[0] for g in group.split(",") if g.strip()}
        imports[area] |= {m for m in found if m != area and m not in ("self", "super")}

areas = sorted(files)
print("| area | files | lines | imports |")
print("|---|---|---|---|")
for a in areas:
    deps = ", ".join(sorted(d for d in imports[a] if d in files or d in ("lib",)))
    print(f"| `{a}` | {len(files[a])} | {lines[a]} | {deps or '-'} |")

def cycles(nodes, edges):
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        for w in edges(v):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))
    for v in nodes:
        if v not in index:
            visit(v)
    return found

sys.setrecursionlimit(10000)
sccs = cycles(areas, lambda v: [w for w in imports[v] if w in files])
print()
print("import cycles between areas:", "; ".join(" <-> ".join(c) for c in sccs) if sccs else "none")
# Within an area: which of its modules name which others.
module_refs = defaultdict(set)
for a in areas:
    mods = {os.path.splitext(os.path.basename(f))[0]: f for f in files[a]
            if not f.endswith("mod.rs") and "/" in f}
    for f in files[a]:
        if f.endswith("mod.rs") or "/" not in f:
            continue
        code = code_of[f]
        me = os.path.splitext(os.path.basename(f))[0]
        for m in mods:
            if m != me and re.search(r"(super|crate::%s)::%s\b" % (a, m), code):
                module_refs[(a, me)].add((a, m))
cyc2 = cycles(list(module_refs), lambda v: module_refs[v])
print("import cycles inside an area:", "; ".join(
    c[0][0] + "/{" + ", ".join(m for _, m in c) + "}" for c in cyc2) if cyc2 else "none")
root_files = sorted(n for n in os.listdir(src) if n.endswith(".rs"))
print("files directly under src/:", len(root_files), "(" + ", ".join(root_files) + ")")
