"""Import cycles among the modules of a Python package (static, from `import` statements, including
ones inside functions and TYPE_CHECKING blocks excluded). Usage: python import_cycles.py SRC_PACKAGE_DIR
Prints each strongly connected component of size > 1 and the count last; exit 1 if any."""
import ast
import os
import sys

root = os.path.abspath(sys.argv[1]); pkg = os.path.basename(root); base = os.path.dirname(root)
mods = {}
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith('.py'):
            p = os.path.join(d, f)
            name = os.path.relpath(p, base)[:-3].replace(os.sep, '.')
            if name.endswith('.__init__'):
                name = name[:-9]
            mods[name] = p
def resolve(cur, is_pkg, level, module):
    parts = cur.split('.')
    if level:
        parts = parts if is_pkg else parts[:-1]
        parts = parts[:len(parts) - (level - 1)]
        return '.'.join(parts + ([module] if module else []))
    return module
graph = {m: set() for m in mods}
for m, p in mods.items():
    is_pkg = p.endswith('__init__.py')
    tree = ast.parse(open(p).read())
    tc = set()
    for node in ast.walk(tree):  # skip `if TYPE_CHECKING:` bodies
        if isinstance(node, ast.If) and 'TYPE_CHECKING' in ast.unparse(node.test):
            tc.update(id(n) for b in node.body for n in ast.walk(b))
    for node in ast.walk(tree):
        if id(node) in tc:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            t = resolve(m, is_pkg, node.level, node.module)
            # `from pkg import sub` depends on the submodule; `from mod import name` on the module
            targets = [f'{t}.{a.name}' if f'{t}.{a.name}' in mods else t for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition('.')[0]
            if t and t != m and t.split('.')[0] == pkg:
                graph[m].add(t)
# Tarjan SCC
idx, low, on, st, out, c = {}, {}, set(), [], [], [0]
def sc(v):
    idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
    for w in graph[v]:
        if w not in idx:
            sc(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        comp = []
        while True:
            w = st.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: out.append(sorted(comp))
sys.setrecursionlimit(10000)
for v in graph:
    if v not in idx: sc(v)
for comp in out: print('cycle:', ', '.join(comp))
print(f'{len(out)} import cycles among {len(mods)} modules of {pkg}')
sys.exit(1 if out else 0)
