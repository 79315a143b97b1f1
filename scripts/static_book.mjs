// The book as static HTML from MyST's site content, with no download: what `make book` builds
// when the book theme cannot be downloaded (scripts/build_book.py runs it).
//
//   node scripts/static_book.mjs _build/site _build/html
//
// Every page of _build/site/content/*.json (MyST's AST, with executed outputs, resolved links and
// citations, pre-rendered KaTeX) becomes one HTML file with the table of contents as a sidebar;
// figures and downloads are copied from _build/site/public. Math shows as MathML (no fonts or CDN).
// Widgets show their static fallback: the figure each lecture draws before its interactive control.
// Then every local link and anchor is checked; the summary is printed as JSON on the last line.
import fs from 'node:fs';
import path from 'node:path';
import { unified } from 'unified';
import rehypeStringify from 'rehype-stringify';
import { mystToHast } from 'myst-to-html';
import { all } from 'mdast-util-to-hast';

const [site, out] = process.argv.slice(2);
if (!site || !out) throw new Error('usage: node scripts/static_book.mjs _build/site OUTPUT_FOLDER');
const start = Date.now();
const config = JSON.parse(fs.readFileSync(path.join(site, 'config.json'), 'utf8'));
const project = config.projects[0];
const pageFile = (slug) => (slug === project.index ? 'index' : slug) + '.html';
// `/labs/vit` (a page's URL) -> labs.vit.html; `/` -> index.html.
const urlToFile = (url) => pageFile(url.replace(/^\/|\/$/g, '').replace(/\//g, '.') || project.index);
const raw = (html) => ({ type: 'raw', value: html });
const escape = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const ANSI = /\u001b\[[0-9;]*m/g;

function href(node) {
  if (node.static) return 'public' + node.url;
  if (node.internal || node.dataUrl || node.resolved) {
    // A label on a page's title (`(api-vit)=` above it) leads to the page itself: no html_id.
    const anchor = node.html_id || (node.url || '').split('#')[1] || '';
    const file = node.url && node.url.startsWith('/') ? urlToFile(node.url.split('#')[0]) : '';
    return file + (anchor ? '#' + anchor : '');
  }
  return node.url;
}

function outputHast(h, data) {
  const d = data.data || {};
  if (data.output_type === 'stream') return h(data, 'pre', { class: 'output stream' }, [{ type: 'text', value: data.text.replace(ANSI, '') }]);
  if (data.output_type === 'error') return h(data, 'pre', { class: 'output error' }, [{ type: 'text', value: data.traceback.replace(ANSI, '') }]);
  if (d['application/vnd.jupyter.widget-view+json']) {
    // `widgets.interact`: the lectures draw its static figure just above. Other widgets (tqdm's
    // progress bars) have nothing to show once the run is over.
    if (!(d['text/plain']?.content || '').startsWith('interactive(')) return null;
    return h(data, 'p', { class: 'output widget' }, [{ type: 'text', value: 'Interactive widget: open the notebook in JupyterLab or Colab to use it (the figure above is its static version).' }]);
  }
  for (const kind of ['image/svg+xml', 'image/png', 'image/jpeg', 'image/gif'])
    if (d[kind]) return h(data, 'img', { src: 'public' + d[kind].path, alt: d['text/plain']?.content || 'figure', class: 'output' });
  if (d['text/html']) return h(data, 'div', { class: 'output html' }, [raw(d['text/html'].content)]);
  if (d['text/markdown']) return h(data, 'pre', { class: 'output' }, [{ type: 'text', value: d['text/markdown'].content }]);
  if (d['text/plain']) return h(data, 'pre', { class: 'output' }, [{ type: 'text', value: d['text/plain'].content }]);
  return h(data, 'div', { class: 'output' });
}

const handlers = {
  link: (h, node) => h(node, 'a', { href: href(node), ...(/^https?:/.test(href(node)) ? { target: '_blank', rel: 'noreferrer' } : {}) }, all(h, node)),
  crossReference: (h, node) => h(node, 'a', { href: href(node) }, all(h, node)),
  image: (h, node) => h(node, 'img', { src: node.url.startsWith('/') ? 'public' + node.url : node.url, alt: node.alt, width: node.width }),
  heading: (h, node) => h(node, `h${node.depth}`, { id: node.html_id || node.identifier }, all(h, node)),
  math: (h, node) => h(node, 'div', { class: 'math-display', id: node.html_id || undefined }, [raw(node.html || escape(node.value))]),
  inlineMath: (h, node) => h(node, 'span', { class: 'math-inline' }, [raw(node.html || escape(node.value))]),
  cite: (h, node) => h(node, 'a', { href: `#cite-${node.identifier}`, class: 'cite' }, all(h, node)),
  citeGroup: (h, node) => {
    const parts = all(h, node).flatMap((c, i) => (i ? [{ type: 'text', value: node.kind === 'parenthetical' ? '; ' : ', ' }, c] : [c]));
    return h(node, 'span', { class: 'cite-group' }, node.kind === 'parenthetical' ? [{ type: 'text', value: '(' }, ...parts, { type: 'text', value: ')' }] : parts);
  },
  outputs: (h, node) => h(node, 'div', { class: 'outputs' }, node.children.map((o) => outputHast(h, o.jupyter_data || {})).filter(Boolean)),
  block: (h, node) => h(node, 'div', { class: node.kind === 'notebook-code' ? 'cell' : 'block' }, all(h, node)),
};
const render = (tree) => unified().use(rehypeStringify, { allowDangerousHtml: true }).stringify(mystToHast({ handlers, allowDangerousHtml: true })(tree));

// The sidebar: the table of contents of config.json (a level-1 entry without a slug is a part title).
const pages = [{ slug: project.index, title: 'Introduction', level: 1 }, ...project.pages];
function sidebar(current) {
  return pages.map((p) => (p.slug
    ? `<li class="level${p.level}"><a href="${pageFile(p.slug)}"${p.slug === current ? ' class="current"' : ''}>${escape(p.title)}</a></li>`
    : `<li class="part">${escape(p.title)}</li>`)).join('\n');
}

const CSS = `body{margin:0;font:16px/1.55 system-ui,sans-serif;color:#222;display:flex}
nav{width:290px;flex:none;height:100vh;overflow:auto;position:sticky;top:0;background:#f6f7f9;border-right:1px solid #ddd;padding:1em;box-sizing:border-box;font-size:14px}
nav ul{list-style:none;padding:0;margin:0}nav li{margin:.2em 0}nav li.part{font-weight:600;margin-top:1em;color:#555}nav li.level2{padding-left:.8em}
nav a{color:#1a4f8b;text-decoration:none}nav a.current{font-weight:700;color:#000}
main{max-width:900px;padding:1.5em 2.5em;min-width:0}pre{background:#f4f4f4;padding:.6em;overflow:auto;font-size:13px}
.cell>pre{border-left:3px solid #7aa6d6}.output{margin:.3em 0}pre.output{background:#fff;border:1px solid #eee}pre.error{background:#fdecec}
img.output,main img{max-width:100%}.admonition{border-left:4px solid #3a7bd5;background:#eef4fc;padding:.4em 1em;margin:1em 0}
.admonition.important{border-color:#d9822b;background:#fdf3e7}.admonition-title{font-weight:700;margin:.3em 0}
.math-display{overflow-x:auto;margin:.8em 0}.katex-html{display:none}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}
.references li{margin:.4em 0}.pager{display:flex;justify-content:space-between;margin-top:3em;border-top:1px solid #ddd;padding-top:1em}`;

fs.rmSync(out, { recursive: true, force: true });
fs.mkdirSync(out, { recursive: true });
fs.cpSync(path.join(site, 'public'), path.join(out, 'public'), { recursive: true });
const linkable = pages.filter((p) => p.slug);
let figures = 0;
for (const [i, p] of linkable.entries()) {
  const page = JSON.parse(fs.readFileSync(path.join(site, 'content', p.slug + '.json'), 'utf8'));
  let body = render(page.mdast);
  figures += (body.match(/<img\b(?:[^>"]|"[^"]*")*class="output"/g) || []).length;
  const title = page.frontmatter?.title || p.title;
  if (!page.frontmatter?.content_includes_title) body = `<h1>${escape(title)}</h1>\n` + body;
  const cite = page.references?.cite;
  if (cite?.order?.length)
    body += `<section class="references"><h2 id="references">References</h2><ol>${cite.order.map((k) => `<li id="cite-${k}">${cite.data[k].html}</li>`).join('\n')}</ol></section>`;
  const prev = linkable[i - 1], next = linkable[i + 1];
  const pager = `<div class="pager">${prev ? `<a href="${pageFile(prev.slug)}">&larr; ${escape(prev.title)}</a>` : '<span></span>'}${next ? `<a href="${pageFile(next.slug)}">${escape(next.title)} &rarr;</a>` : ''}</div>`;
  fs.writeFileSync(path.join(out, pageFile(p.slug)), `<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>${escape(title)} · ${escape(project.title)}</title><style>${CSS}</style></head>
<body><nav><p><a href="index.html"><strong>${escape(project.title)}</strong></a></p><ul>${sidebar(p.slug)}</ul></nav>
<main>${body}${pager}</main>
<script>document.querySelector('nav a.current')?.scrollIntoView({ block: 'center' });</script></body></html>\n`);
}

// Every local href/src must lead to a file, and every #anchor to an id on its page.
const ids = new Map(), broken = [];
let links = 0;
for (const f of fs.readdirSync(out).filter((f) => f.endsWith('.html')))
  ids.set(f, new Set([...fs.readFileSync(path.join(out, f), 'utf8').matchAll(/ id="([^"]+)"/g)].map((m) => m[1])));
for (const f of ids.keys()) {
  for (const [, url] of fs.readFileSync(path.join(out, f), 'utf8').matchAll(/(?:href|src)="([^"]*)"/g)) {
    if (/^[a-z]+:/.test(url)) continue;
    links += 1;
    const [file, anchor] = url.split('#');
    const target = file ? decodeURIComponent(file) : f;
    if (!fs.existsSync(path.join(out, target))) broken.push(`${f}: ${url} (no file)`);
    else if (anchor && target.endsWith('.html') && !ids.get(target)?.has(anchor)) broken.push(`${f}: ${url} (no anchor)`);
  }
}
console.log(JSON.stringify({ pages: linkable.length, figures, links, broken, seconds: (Date.now() - start) / 1000 }));
process.exit(broken.length ? 1 : 0);
