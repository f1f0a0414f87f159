// The Plait dashboard: one page, hash routes, plain DOM, no build step.
//
// Everything shown comes from the JSON API in docs/dashboard-api.md. Step ids, messages,
// tracebacks and metadata are user data, so HTML is only ever built from esc()'d strings or
// with textContent.
'use strict';

(() => {

const STATUSES = ['PENDING', 'QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CACHED', 'SKIPPED',
  'CANCELLED', 'RETRYING', 'CRASHED'];
const TERMINAL = new Set(['SUCCEEDED', 'FAILED', 'CACHED', 'SKIPPED', 'CANCELLED', 'CRASHED']);
const RUNS_POLL_MS = 2000;
const REFETCH_MS = 500;

const app = document.getElementById('app');

// ---------------------------------------------------------------------------------------------
// Formatting

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
function esc(v) {
  return String(v ?? '').replace(/[&<>"']/g, (c) => ESCAPES[c]);
}
const enc = encodeURIComponent;

// Statuses end up in class names; keep them to letters whatever the server sends.
function cls(status) {
  return String(status || 'NONE').replace(/[^A-Za-z_]/g, '');
}

function short(id, n = 12) {
  return id ? String(id).slice(0, n) : '';
}

function digestShort(d) {
  if (!d) return '';
  const i = d.indexOf(':');
  return (i >= 0 && i < 12 ? d.slice(i + 1) : d).slice(0, 12);
}

function pad(n) {
  return String(n).padStart(2, '0');
}

function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function fmtDuration(sec) {
  if (sec === null || sec === undefined || Number.isNaN(sec)) return '';
  if (sec < 10) return `${Math.max(sec, 0).toFixed(2)}s`;
  if (sec < 60) return `${sec.toFixed(1)}s`;
  if (sec < 3600) return `${Math.floor(sec / 60)}m ${pad(Math.floor(sec % 60))}s`;
  return `${Math.floor(sec / 3600)}h ${pad(Math.floor((sec % 3600) / 60))}m`;
}

function fmtAge(sec) {
  if (sec === null || sec === undefined) return '—';
  if (sec < 60) return `${Math.floor(sec)}s ago`;
  if (sec < 3600) return `${Math.floor(sec / 60)} min ago`;
  if (sec < 86400) return `${Math.floor(sec / 3600)} h ago`;
  return `${Math.floor(sec / 86400)} d ago`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return i === 0 ? `${v} B` : `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

// A run or step still going has no duration yet; show how long it has been running.
function elapsed(startIso, endIso, seconds) {
  if (seconds !== null && seconds !== undefined) return seconds;
  if (!startIso || endIso) return null;
  const t = Date.parse(startIso);
  return Number.isNaN(t) ? null : (Date.now() - t) / 1000;
}

function badge(status, id) {
  const s = status || '';
  return `<span class="badge st-${cls(s)}" data-status="${esc(s)}"${id ? ` id="${id}"` : ''}>` +
    `${esc(s || '—')}</span>`;
}

function timeCell(iso) {
  return `<td class="time" title="${esc(iso || '')}">${esc(fmtTime(iso))}</td>`;
}

function runLink(id, n = 12) {
  if (!id) return '<span class="muted">—</span>';
  return `<a class="mono" href="#/runs/${enc(id)}" title="${esc(id)}">${esc(short(id, n))}</a>`;
}

function stepHref(runId, stepId) {
  return `#/runs/${enc(runId)}/steps/${enc(stepId)}`;
}

function jsonText(v) {
  if (typeof v === 'string') return v;
  try { return JSON.stringify(v, null, 2); } catch { return String(v); }
}

// One-line values stay inline; anything longer gets a <pre> of its own.
function valueHtml(v) {
  const t = typeof v === 'string' ? JSON.stringify(v) : jsonText(v);
  if (t === undefined) return '<span class="muted">—</span>';
  return t.length > 60 || t.includes('\n') ? `<pre class="value">${esc(t)}</pre>`
    : `<code>${esc(t)}</code>`;
}

function kvTable(obj, emptyText) {
  const keys = obj ? Object.keys(obj) : [];
  if (!keys.length) return `<tbody><tr class="empty"><td>${esc(emptyText)}</td></tr></tbody>`;
  return '<tbody>' + keys.map((k) =>
    `<tr><th scope="row">${esc(k)}</th><td>${valueHtml(obj[k])}</td></tr>`).join('') + '</tbody>';
}

// ---------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(message, status, code, silent = false) {
    super(message);
    this.status = status;
    this.code = code;
    this.silent = silent;
  }
}

let leaving = false;
function goLogin(to) {
  if (leaving) return;
  leaving = true;
  location.href = to || '/login';
}

async function api(path, opts = {}) {
  let res;
  try {
    res = await fetch(path, {
      method: opts.method || 'GET',
      credentials: 'same-origin',
      headers: { Accept: 'application/json', ...(opts.headers || {}) },
    });
  } catch (e) {
    throw new ApiError(`Cannot reach the dashboard server (${e.message}).`, 0, 'NETWORK');
  }
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (res.status === 401) {
    goLogin(body && typeof body.login === 'string' && body.login.startsWith('/') ? body.login : '/login');
    throw new ApiError('Your session has ended; signing in again.', 401, 'UNAUTHENTICATED', true);
  }
  if (!res.ok) {
    const msg = body && body.error ? body.error : `${res.status} ${res.statusText || 'error'}`;
    throw new ApiError(msg, res.status, body && body.code);
  }
  if (body === null && text) throw new ApiError('The server sent a response that is not JSON.', res.status);
  return body;
}

let sessionPromise = null;
function session() {
  if (!sessionPromise) {
    sessionPromise = api('/api/session').catch((e) => { sessionPromise = null; throw e; });
  }
  return sessionPromise;
}

async function post(path) {
  const s = await session();
  try {
    return await api(path, { method: 'POST', headers: { 'X-Plait-CSRF': s.csrf || '' } });
  } catch (e) {
    // A stale token (another sign-in replaced the session) must not stick for the next try.
    if (e.status === 403) sessionPromise = null;
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// The error banner

const banner = document.getElementById('error-banner');
const bannerText = document.getElementById('error-text');
let bannerSource = null;

function showError(err, source = null) {
  if (err && err.silent) return;
  const msg = err instanceof Error ? err.message : String(err);
  bannerText.textContent = msg || 'Something went wrong.';
  banner.hidden = false;
  bannerSource = source;
  if (!(err instanceof ApiError)) console.error(err);
}

function clearError(source) {
  if (source !== undefined && bannerSource !== source) return;
  banner.hidden = true;
  bannerText.textContent = '';
  bannerSource = null;
}

document.getElementById('error-dismiss').addEventListener('click', () => clearError());

// ---------------------------------------------------------------------------------------------
// Page lifetimes: everything a page starts (timers, event streams) is owned by its context
// and ends with it, so nothing keeps running after navigating away.

function makeCtx() {
  const ctx = {
    alive: true,
    cleanups: [],
    onCleanup(f) { this.cleanups.push(f); },
    every(ms, f) { const t = setInterval(f, ms); this.onCleanup(() => clearInterval(t)); },
    later(ms, f) {
      const t = setTimeout(() => { if (ctx.alive) f(); }, ms);
      this.onCleanup(() => clearTimeout(t));
      return t;
    },
    listen(target, type, f, opts) {
      target.addEventListener(type, f, opts);
      this.onCleanup(() => target.removeEventListener(type, f, opts));
    },
    dispose() {
      this.alive = false;
      const fs = this.cleanups.splice(0);
      for (const f of fs) { try { f(); } catch (e) { console.error(e); } }
    },
  };
  return ctx;
}

// The server ends a stream that failed after it started with `event: error` and a JSON body;
// EventSource delivers that to the same handler as a dropped connection, with data.
function streamError(ev) {
  if (!ev || typeof ev.data !== 'string' || !ev.data) return null;
  let doc = null;
  try { doc = JSON.parse(ev.data); } catch { doc = null; }
  return new ApiError((doc && doc.error) || 'The live stream failed.', 0, doc && doc.code);
}

// A rejected promise from a page that has since been left is nobody's business.
function guard(ctx, p, source) {
  return p.catch((e) => { if (ctx.alive) showError(e, source); throw e; });
}

// ---------------------------------------------------------------------------------------------
// The DAG: one SVG string per render, positions straight from the graph's layer/row, no layout
// measuring, one delegated click listener.

const NODE_W = 156;
const NODE_H = 44;
const DX = 184;
const DY = 56;
const PAD = 24;
const ID_CHARS = 19;
const EXTRA_CHARS = 25;

function ellipsis(s, n) {
  s = String(s);
  return s.length > n ? s.slice(0, n - 1) + '…' : s;
}

function nodePos(n) {
  return [PAD + (Number(n.layer) || 0) * DX, PAD + (Number(n.row) || 0) * DY];
}

// view(id) -> {status, line2, line3, mapped}
function dagMarkup(graph, view, selected) {
  const nodes = graph.nodes || [];
  const pos = new Map();
  let maxX = 0;
  let maxY = 0;
  for (const n of nodes) {
    const p = nodePos(n);
    pos.set(n.id, p);
    if (p[0] > maxX) maxX = p[0];
    if (p[1] > maxY) maxY = p[1];
  }
  const width = maxX + NODE_W + PAD;
  const height = maxY + NODE_H + PAD;
  const out = [
    '<defs>',
    '<marker id="dag-arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" ' +
      'orient="auto"><path d="M0 0.5L7.5 4L0 7.5z" class="dag-arrow"/></marker>',
    '</defs><g class="dag-edges">',
  ];
  for (const e of graph.edges || []) {
    const a = pos.get(e[0]);
    const b = pos.get(e[1]);
    if (!a || !b) continue;
    const x1 = a[0] + NODE_W;
    const y1 = a[1] + NODE_H / 2;
    const x2 = b[0] - 2;
    const y2 = b[1] + NODE_H / 2;
    const c = Math.max(24, (x2 - x1) / 2);
    out.push(`<path class="dag-edge" d="M${x1} ${y1}C${x1 + c} ${y1} ${x2 - c} ${y2} ${x2} ${y2}"/>`);
  }
  out.push('</g><g class="dag-nodes">');
  for (const n of nodes) {
    const p = pos.get(n.id);
    const v = view(n.id);
    const s = v.status || '';
    const klass = `dag-node st-${cls(s)}${v.mapped ? ' mapped' : ''}${n.id === selected ? ' selected' : ''}`;
    out.push(
      `<g class="${klass}" data-step-id="${esc(n.id)}" data-status="${esc(s)}" ` +
      `transform="translate(${p[0]} ${p[1]})"><title>${esc(v.title || n.id)}</title>`,
      v.mapped ? `<rect class="n-stack" x="4" y="-4" width="${NODE_W}" height="${NODE_H}" rx="6"/>` : '',
      `<rect class="n-box" width="${NODE_W}" height="${NODE_H}" rx="6"/>`,
      `<rect class="n-bar" x="0" y="0" width="4" height="${NODE_H}" rx="2"/>`,
      // Text is cut by character count, not clipped: a clip path per node costs more to lay
      // out and paint than the whole rest of the node. Two lines share one <text>.
      `<text class="n-id" x="11" y="${v.line2 || v.line3 ? 15 : 27}">${esc(ellipsis(n.id, ID_CHARS))}</text>`,
      `<text class="n-sub"><tspan class="n-status" x="11" y="28">${esc(v.line2 || '')}</tspan>`,
      `<tspan class="n-extra" x="11" y="39">${esc(ellipsis(v.line3 || '', EXTRA_CHARS))}</tspan></text>`,
      '</g>',
    );
  }
  out.push('</g>');
  return { markup: out.join(''), width, height, pos };
}

// Pan by dragging, zoom with the wheel, by rewriting the viewBox only. The initial view is
// computed from sizes known before the SVG exists, so inserting it costs one layout, not two.
function panZoom(ctx, width, height, cw, ch) {
  const view = { x: 0, y: 0, k: 1 };
  let svg = null;
  let drag = null;
  let suppressClick = false;
  let touched = false;   // once the user pans or zooms, resizes keep their view

  function viewBox() {
    return `${view.x.toFixed(1)} ${view.y.toFixed(1)} ${(cw / view.k).toFixed(1)} ${(ch / view.k).toFixed(1)}`;
  }
  function apply() {
    if (svg) svg.setAttribute('viewBox', viewBox());
  }
  function center(k) {
    view.k = k;
    view.x = width * k < cw ? (width - cw / k) / 2 : 0;
    view.y = height * k < ch ? (height - ch / k) / 2 : 0;
    apply();
  }
  function fitAll() { center(Math.min(cw / width, ch / height, 1.5)); }
  function initial() {
    // Small graphs fit; a long one starts at its beginning at a readable size.
    const fit = Math.min(1, cw / width, ch / height);
    center(fit >= 0.55 ? fit : Math.max(0.55, Math.min(1, ch / height)));
  }
  function zoomAt(factor, px, py) {
    touched = true;
    const k = Math.min(3, Math.max(0.03, view.k * factor));
    const sx = view.x + px / view.k;
    const sy = view.y + py / view.k;
    view.k = k;
    view.x = sx - px / k;
    view.y = sy - py / k;
    apply();
  }
  function refit() {
    // After the graph's box changed size: keep the user's view, or fit the graph again.
    const w = svg.clientWidth;
    const h = svg.clientHeight;
    if (w && h && (w !== cw || h !== ch)) {
      cw = w;
      ch = h;
      if (touched) apply(); else initial();
    }
  }
  function focus(x, y) {
    // The panel opening may just have resized the graph; judge against the view it will get.
    refit();
    const vw = cw / view.k;
    const vh = ch / view.k;
    if (x >= view.x && x + NODE_W <= view.x + vw && y >= view.y && y + NODE_H <= view.y + vh) return;
    touched = true;
    view.x = x + NODE_W / 2 - vw / 2;
    view.y = y + NODE_H / 2 - vh / 2;
    apply();
  }

  function attach(el) {
  svg = el;
  ctx.listen(svg, 'pointerdown', (e) => {
    if (e.button !== 0) return;
    suppressClick = false;
    drag = { px: e.clientX, py: e.clientY, x: view.x, y: view.y, id: e.pointerId, moved: false };
  });
  ctx.listen(svg, 'pointermove', (e) => {
    if (!drag || e.pointerId !== drag.id) return;
    const dx = e.clientX - drag.px;
    const dy = e.clientY - drag.py;
    if (!drag.moved) {
      if (Math.abs(dx) + Math.abs(dy) < 4) return;
      // Capture only once it is a drag: capturing on pointerdown would retarget the click.
      drag.moved = true;
      touched = true;
      svg.setPointerCapture(e.pointerId);
      svg.classList.add('panning');
    }
    view.x = drag.x - dx / view.k;
    view.y = drag.y - dy / view.k;
    apply();
  });
  const end = () => {
    if (drag && drag.moved) suppressClick = true;
    drag = null;
    svg.classList.remove('panning');
  };
  ctx.listen(svg, 'pointerup', end);
  ctx.listen(svg, 'pointercancel', end);
  ctx.listen(svg, 'wheel', (e) => {
    e.preventDefault();
    const r = svg.getBoundingClientRect();
    const delta = e.deltaMode === 1 ? e.deltaY * 16 : e.deltaY;
    zoomAt(Math.exp(-delta * 0.0015), e.clientX - r.left, e.clientY - r.top);
  }, { passive: false });
  if (window.ResizeObserver) {
    const ro = new ResizeObserver(refit);
    ro.observe(svg);
    ctx.onCleanup(() => ro.disconnect());
  }
  }
  initial();
  return {
    attach,
    viewBox,
    fitAll,
    focus,
    zoom(f) { zoomAt(f, cw / 2, ch / 2); },
    consumeClick() { const s = suppressClick; suppressClick = false; return s; },
  };
}

// Renders the graph into `host` and returns what the run page needs to patch it in place.
function renderDag(ctx, host, graph, view, { selected = null, onSelect = null } = {}) {
  const t0 = performance.now();
  const { markup, width, height, pos } = dagMarkup(graph, view, selected);
  const t1 = performance.now();
  const maxH = Math.max(240, Math.round(window.innerHeight * 0.62));
  const svgH = Math.min(maxH, Math.max(200, height + 8));
  host.textContent = '';
  const pz = panZoom(ctx, width, height, host.clientWidth || 800, svgH);
  host.innerHTML =
    `<svg id="dag" class="dag" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="Pipeline graph" ` +
    `style="height:${svgH}px" viewBox="${pz.viewBox()}">${markup}</svg>` +
    '<div class="dag-tools">' +
    '<button type="button" data-zoom="in" title="Zoom in" aria-label="Zoom in">+</button>' +
    '<button type="button" data-zoom="out" title="Zoom out" aria-label="Zoom out">−</button>' +
    '<button type="button" data-zoom="fit" title="Fit the whole graph" aria-label="Fit">' +
    '<svg width="12" height="12" viewBox="0 0 12 12" aria-hidden="true"><path d="M1 4V1h3M8 1h3v3M11 8v3H8M4 11H1V8" fill="none" stroke="currentColor" stroke-width="1.5"/></svg></button>' +
    '</div>';
  const t2 = performance.now();
  const svg = host.querySelector('svg.dag');
  pz.attach(svg);
  const nodes = new Map();
  for (const g of svg.querySelectorAll('g.dag-node')) nodes.set(g.getAttribute('data-step-id'), g);
  host.querySelector('.dag-tools').addEventListener('click', (e) => {
    const b = e.target.closest('button[data-zoom]');
    if (!b) return;
    const z = b.getAttribute('data-zoom');
    if (z === 'fit') pz.fitAll(); else pz.zoom(z === 'in' ? 1.25 : 0.8);
  });
  svg.addEventListener('click', (e) => {
    if (pz.consumeClick()) return;
    const g = e.target.closest('g.dag-node');
    if (g && onSelect) onSelect(g.getAttribute('data-step-id'));
  });
  svg.dataset.renderMs = (performance.now() - t0).toFixed(1);
  svg.dataset.timing = `markup ${(t1 - t0).toFixed(1)} insert ${(t2 - t1).toFixed(1)}`;
  return { svg, nodes, pos, pz };
}

function setNodeStatus(g, status) {
  const s = status || '';
  if (g.getAttribute('data-status') === s) return;
  const old = g.getAttribute('data-status');
  if (old !== null) g.classList.remove(`st-${cls(old)}`);
  g.classList.add(`st-${cls(s)}`);
  g.setAttribute('data-status', s);
}

function setText(el, text) {
  if (el && el.textContent !== text) el.textContent = text;
}

// ---------------------------------------------------------------------------------------------
// Runs list

const runsFilter = { pipeline: '', status: '', since: '', until: '', token: '', stack: [] };

function localToIso(v) {
  if (!v) return '';
  const d = new Date(v);
  return Number.isNaN(d.getTime()) ? '' : d.toISOString();
}

function runsPage(ctx) {
  const f = runsFilter;
  app.innerHTML = `
    <div class="page-head"><h1>Runs</h1><span class="live" title="Refreshes every 2 seconds">live</span></div>
    <form id="run-filters" class="filters" autocomplete="off">
      <label>Pipeline <input id="filter-pipeline" list="pipeline-names" placeholder="any" value="${esc(f.pipeline)}"></label>
      <datalist id="pipeline-names"></datalist>
      <label>Status <select id="filter-status"><option value="">any</option>${STATUSES.map((s) =>
        `<option value="${s}"${f.status === s ? ' selected' : ''}>${s}</option>`).join('')}</select></label>
      <label>Since <input type="datetime-local" id="filter-since" step="1" value="${esc(f.since)}"></label>
      <label>Until <input type="datetime-local" id="filter-until" step="1" value="${esc(f.until)}"></label>
      <button type="button" id="filter-clear" class="btn-quiet">Clear</button>
    </form>
    <table id="runs-table" class="grid">
      <thead><tr><th>Run</th><th>Pipeline</th><th>Status</th><th>Created</th><th class="num">Duration</th><th>Retry of</th></tr></thead>
      <tbody><tr class="empty"><td colspan="6">Loading…</td></tr></tbody>
    </table>
    <div class="pager">
      <button type="button" id="prev-page" class="btn" disabled>‹ Newer</button>
      <span id="page-info" class="muted"></span>
      <button type="button" id="next-page" class="btn" disabled>Older ›</button>
    </div>`;
  // Enter in a filter must not submit the form (a page load); filters apply as they change.
  document.getElementById('run-filters').addEventListener('submit', (e) => e.preventDefault());
  const tbody = app.querySelector('#runs-table tbody');
  const prev = document.getElementById('prev-page');
  const next = document.getElementById('next-page');
  let nextToken = '';
  let seq = 0;
  let inflight = false;
  let lastJson = '';

  function rowHtml(r) {
    const d = elapsed(r.create_time, r.end_time, r.duration_seconds);
    return `<tr class="run-row" data-run-id="${esc(r.run_id)}" data-status="${esc(r.status)}">` +
      `<td>${runLink(r.run_id)}</td>` +
      `<td><a href="#/pipelines/${enc(r.pipeline || '')}">${esc(r.pipeline)}</a></td>` +
      `<td>${badge(r.status)}</td>${timeCell(r.create_time)}` +
      `<td class="num dur" data-start="${esc(r.end_time ? '' : r.create_time || '')}">${esc(fmtDuration(d))}</td>` +
      `<td>${r.retry_of ? runLink(r.retry_of) : ''}</td></tr>`;
  }

  async function load(poll = false) {
    if (poll && inflight) return;
    const mine = ++seq;
    inflight = true;
    const q = new URLSearchParams();
    if (f.pipeline.trim()) q.set('pipeline', f.pipeline.trim());
    if (f.status) q.set('status', f.status);
    if (localToIso(f.since)) q.set('since', localToIso(f.since));
    if (localToIso(f.until)) q.set('until', localToIso(f.until));
    q.set('page_size', '50');
    if (f.token) q.set('page_token', f.token);
    try {
      const data = await api(`/api/runs?${q}`);
      if (!ctx.alive || mine !== seq) return;
      clearError('runs');
      nextToken = data.next_page_token || '';
      next.disabled = !nextToken;
      prev.disabled = f.stack.length === 0;
      setText(document.getElementById('page-info'), `page ${f.stack.length + 1}`);
      const json = JSON.stringify(data.runs);
      if (json === lastJson) {
        // Same rows: only the clocks of running runs move; leave the rest alone so a click
        // in progress does not land on a replaced row.
        for (const td of tbody.querySelectorAll('td.dur[data-start]:not([data-start=""])')) {
          setText(td, fmtDuration(elapsed(td.dataset.start, null, null)));
        }
        return;
      }
      lastJson = json;
      const runs = data.runs || [];
      tbody.innerHTML = runs.length ? runs.map(rowHtml).join('')
        : '<tr class="empty"><td colspan="6">No runs match these filters.</td></tr>';
    } catch (e) {
      if (ctx.alive && mine === seq) showError(e, 'runs');
    } finally {
      if (mine === seq) inflight = false;
    }
  }

  function refilter() {
    f.token = '';
    f.stack = [];
    lastJson = '';
    load();
  }

  let typing = null;
  const pipe = document.getElementById('filter-pipeline');
  pipe.addEventListener('input', () => {
    clearTimeout(typing);
    typing = setTimeout(() => { if (ctx.alive && f.pipeline !== pipe.value) { f.pipeline = pipe.value; refilter(); } }, 300);
  });
  pipe.addEventListener('change', () => {
    clearTimeout(typing);
    if (f.pipeline !== pipe.value) { f.pipeline = pipe.value; refilter(); }
  });
  ctx.onCleanup(() => clearTimeout(typing));
  for (const [id, key] of [['filter-status', 'status'], ['filter-since', 'since'], ['filter-until', 'until']]) {
    const el = document.getElementById(id);
    el.addEventListener('change', () => { f[key] = el.value; refilter(); });
  }
  document.getElementById('filter-clear').addEventListener('click', () => {
    f.pipeline = f.status = f.since = f.until = '';
    for (const id of ['filter-pipeline', 'filter-status', 'filter-since', 'filter-until']) {
      document.getElementById(id).value = '';
    }
    refilter();
  });
  next.addEventListener('click', () => {
    if (!nextToken) return;
    f.stack.push(f.token);
    f.token = nextToken;
    next.disabled = prev.disabled = true;
    load();
  });
  prev.addEventListener('click', () => {
    if (!f.stack.length) return;
    f.token = f.stack.pop();
    next.disabled = prev.disabled = true;
    load();
  });
  tbody.addEventListener('click', (e) => {
    if (e.target.closest('a')) return;
    const tr = e.target.closest('tr.run-row');
    if (tr) location.hash = `#/runs/${enc(tr.dataset.runId)}`;
  });

  api('/api/pipelines').then((d) => {
    if (!ctx.alive) return;
    const dl = document.getElementById('pipeline-names');
    dl.innerHTML = (d.pipelines || []).map((p) => `<option value="${esc(p.name)}"></option>`).join('');
  }).catch(() => { /* the filter still works as free text */ });

  load();
  ctx.every(RUNS_POLL_MS, () => { if (!document.hidden) load(true); });
  ctx.listen(document, 'visibilitychange', () => { if (!document.hidden) load(true); });
}

// ---------------------------------------------------------------------------------------------
// Run page

// [statuses, word, short word]
const ITEM_WORDS = [
  [['SUCCEEDED'], 'ok', 'ok'], [['CACHED'], 'cached', 'cached'],
  [['FAILED', 'CRASHED'], 'failed', 'fail'], [['RUNNING', 'RETRYING'], 'running', 'run'],
  [['PENDING', 'QUEUED'], 'pending', 'wait'], [['SKIPPED'], 'skipped', 'skip'],
  [['CANCELLED'], 'cancelled', 'cancel'],
];

// '12 items: 11 ok, 1 failed'. Shorter forms, for a node's one line: `fold` counts cached
// items as ok, `terse` uses short words.
function itemsSummary(items, fold = false, terse = false) {
  const counts = {};
  for (const s of items.values()) counts[s] = (counts[s] || 0) + 1;
  if (fold) {
    counts.SUCCEEDED = (counts.SUCCEEDED || 0) + (counts.CACHED || 0);
    delete counts.CACHED;
  }
  const parts = [];
  for (const [statuses, word, shortWord] of ITEM_WORDS) {
    const n = statuses.reduce((a, s) => a + (counts[s] || 0), 0);
    if (n) parts.push(`${n} ${terse ? shortWord : word}`);
  }
  return `${items.size} item${items.size === 1 ? '' : 's'}: ${parts.join(', ')}`;
}

function itemsLine(items) {
  for (const [fold, terse] of [[false, false], [true, false], [true, true]]) {
    const line = itemsSummary(items, fold, terse);
    if (line.length <= EXTRA_CHARS) return line;
  }
  return itemsSummary(items, true, true);
}

function runPage(ctx, runId, firstStep) {
  app.innerHTML = '<div class="run-page"><p class="muted">Loading run…</p></div>';
  const st = {
    run: null,
    steps: new Map(),
    items: new Map(),          // mapped step id -> Map(item id -> status)
    eventSeq: new Map(),       // step id -> sequence of the last event that set its status
    runEventSeq: 0,
    nodeIds: new Set(),
    nodeKeys: new Map(),
    lastSeq: 0,
    canCancel: false,
    canRetry: false,
    ended: false,
    dag: null,
    selected: firstStep || null,
  };
  let panelCtx = null;
  let panelStatus = null;
  ctx.onCleanup(() => { if (panelCtx) panelCtx.dispose(); });

  const itemParent = (id) => {
    const s = st.steps.get(id);
    if (s && s.parent) return s.parent;
    const m = /^(.*)\[\d+\]$/.exec(id);
    return m && st.nodeIds.has(m[1]) ? m[1] : null;
  };

  function applySteps(steps, asOf) {
    const old = st.steps;
    st.steps = new Map();
    for (const s of steps || []) {
      const prev = old.get(s.step_id);
      // An event newer than this snapshot wins over it.
      if (prev && (st.eventSeq.get(s.step_id) || 0) > asOf) s.status = prev.status;
      st.steps.set(s.step_id, s);
    }
    for (const [id, s] of old) if (!st.steps.has(id) && (st.eventSeq.get(id) || 0) > asOf) st.steps.set(id, s);
    st.items = new Map();
    for (const s of st.steps.values()) {
      const parent = s.parent || (st.nodeIds.has(s.step_id) ? null : itemParent(s.step_id));
      if (!parent) continue;
      if (!st.items.has(parent)) st.items.set(parent, new Map());
      st.items.get(parent).set(s.step_id, s.status);
    }
  }

  function nodeView(id) {
    const s = st.steps.get(id);
    const status = (s && s.status) || 'PENDING';
    const d = s ? s.duration_seconds : null;
    let line2 = status;
    if (d !== null && d !== undefined) line2 += ` · ${fmtDuration(d)}`;
    const items = st.items.get(id);
    let line3 = '';
    let title = id;
    if (items && items.size) {
      const full = itemsSummary(items);
      line3 = itemsLine(items);
      title = `${id}\n${full}`;
    } else if (s && s.cached_from) {
      line3 = `cached from ${short(s.cached_from, 6)}`;
      title = `${id}\ncached from run ${s.cached_from}`;
    }
    return { status, line2, line3, title, mapped: Boolean(items && items.size) };
  }

  function patchNode(id) {
    if (!st.dag) return;
    const g = st.dag.nodes.get(id);
    if (!g) return;
    const v = nodeView(id);
    const key = `${v.status}|${v.line2}|${v.line3}`;
    if (st.nodeKeys.get(id) === key) return;
    st.nodeKeys.set(id, key);
    setNodeStatus(g, v.status);
    setText(g.querySelector('.n-status'), v.line2);
    setText(g.querySelector('.n-extra'), ellipsis(v.line3, EXTRA_CHARS));
    setText(g.querySelector('title'), v.title);
    if (v.mapped && !g.classList.contains('mapped')) {
      g.classList.add('mapped');
      const back = document.createElementNS('http://www.w3.org/2000/svg', 'rect');
      for (const [k, val] of [['class', 'n-stack'], ['x', 4], ['y', -4], ['width', NODE_W], ['height', NODE_H], ['rx', 6]]) back.setAttribute(k, val);
      g.insertBefore(back, g.querySelector('.n-box'));
    }
  }

  // --- header
  function renderHead() {
    const r = st.run;
    const head = document.getElementById('run-head');
    if (!head) return;
    const d = elapsed(r.create_time, r.end_time, r.duration_seconds);
    const params = r.parameters && Object.keys(r.parameters).length ? r.parameters : null;
    head.innerHTML = `
      <div class="title-row">
        <h1>Run <span class="mono" title="${esc(r.run_id)}">${esc(r.run_id)}</span></h1>
        ${badge(r.status, 'run-status')}
        <span class="actions">
          ${st.canCancel ? '<button type="button" id="cancel-run" class="btn danger">Cancel run</button>' : ''}
          ${st.canRetry ? '<button type="button" id="retry-run" class="btn primary">Retry run</button>' : ''}
        </span>
      </div>
      <dl class="facts">
        <div><dt>Pipeline</dt><dd><a href="#/pipelines/${enc(r.pipeline || '')}">${esc(r.pipeline)}</a></dd></div>
        <div><dt>Version</dt><dd>${r.pipeline_version ? `<a class="mono" href="#/versions/${enc(r.pipeline_version)}" title="${esc(r.pipeline_version)}">${esc(short(r.pipeline_version))}</a>` : '—'}</dd></div>
        <div><dt>Created</dt><dd title="${esc(r.create_time || '')}">${esc(fmtTime(r.create_time))}</dd></div>
        <div><dt>Ended</dt><dd title="${esc(r.end_time || '')}">${esc(fmtTime(r.end_time))}</dd></div>
        <div><dt>Duration</dt><dd id="run-duration">${esc(fmtDuration(d) || '—')}</dd></div>
        <div><dt>Stack</dt><dd>${esc(r.stack || '—')}</dd></div>
        ${r.retry_of ? `<div><dt>Retry of</dt><dd>${runLink(r.retry_of)}</dd></div>` : ''}
        <div><dt>Steps</dt><dd id="run-counts">${stepCounts()}</dd></div>
      </dl>
      ${params ? `<details class="params" open><summary>Parameters</summary><table class="kv">${kvTable(params, '')}</table></details>` : ''}`;
  }

  // '1000 steps: 188 SUCCEEDED, 1 RUNNING, 811 PENDING', over the graph's nodes.
  function stepCounts() {
    const counts = new Map();
    for (const id of st.nodeIds) {
      const s = st.steps.get(id);
      const status = (s && s.status) || 'PENDING';
      counts.set(status, (counts.get(status) || 0) + 1);
    }
    const parts = STATUSES.filter((x) => counts.has(x)).map((x) =>
      `<span class="count st-${x}">${counts.get(x)} ${x.toLowerCase()}</span>`);
    return `${st.nodeIds.size} · ${parts.join(' · ')}`;
  }

  function setRunStatus(status, seq) {
    if (!status || !st.run) return;
    if (seq) st.runEventSeq = Math.max(st.runEventSeq, seq);
    if (st.run.status === status) return;
    st.run.status = status;
    const b = document.getElementById('run-status');
    if (b) {
      b.className = `badge st-${cls(status)}`;
      b.setAttribute('data-status', status);
      b.textContent = status;
    }
  }

  // --- refetching after a step ends, at most once per REFETCH_MS
  let refetchTimer = null;
  let refetchBusy = false;
  let refetchAgain = false;
  function scheduleRefetch() {
    if (refetchTimer || refetchBusy) { refetchAgain = true; return; }
    refetchTimer = ctx.later(REFETCH_MS, refetch);
  }
  async function refetch() {
    refetchTimer = null;
    refetchBusy = true;
    try {
      const data = await api(`/api/runs/${enc(runId)}`);
      if (!ctx.alive) return;
      apply(data);
    } catch (e) {
      if (ctx.alive) showError(e);
    } finally {
      refetchBusy = false;
      if (refetchAgain && ctx.alive) { refetchAgain = false; scheduleRefetch(); }
    }
  }

  function apply(data) {
    const asOf = Number(data.last_sequence) || 0;
    const runStatus = st.run && st.runEventSeq > asOf ? st.run.status : null;
    st.run = data.run;
    if (runStatus) st.run.status = runStatus;
    st.canCancel = Boolean(data.can_cancel);
    st.canRetry = Boolean(data.can_retry);
    applySteps(data.steps, asOf);
    renderHead();
    for (const id of st.nodeIds) patchNode(id);
    const sel = st.selected && st.steps.get(st.selected);
    if (sel && panelCtx && sel.status !== panelStatus) loadPanel(st.selected, true);
  }

  // --- the event stream
  let retries = 0;
  function openEvents() {
    if (st.ended || !ctx.alive) return;
    const es = new EventSource(`/api/runs/${enc(runId)}/events?after=${st.lastSeq}`);
    const close = () => es.close();
    ctx.onCleanup(close);
    es.onmessage = (ev) => {
      retries = 0;
      let e;
      try { e = JSON.parse(ev.data); } catch { return; }
      onEvent(e);
    };
    es.addEventListener('end', () => {
      st.ended = true;
      es.close();
      scheduleRefetch();
    });
    es.onerror = (ev) => {
      // Reconnect from the last sequence seen, not from the one the URL was opened with.
      es.close();
      if (st.ended || !ctx.alive) return;
      const told = streamError(ev);
      if (told) {
        // The server said why; trying again would only say it again.
        showError(told);
        st.ended = true;
        scheduleRefetch();
        return;
      }
      retries += 1;
      ctx.later(Math.min(15000, 1000 * 2 ** Math.min(retries, 4)), () => { scheduleRefetch(); openEvents(); });
    };
  }

  function onEvent(e) {
    const seq = Number(e.sequence) || 0;
    if (seq) {
      if (seq <= st.lastSeq) return;
      st.lastSeq = seq;
    }
    if (e.run_status) setRunStatus(e.run_status, seq);
    const id = e.step_id;
    if (!id) {
      if (TERMINAL.has(e.run_status) || e.run_status === 'CANCELLED') scheduleRefetch();
      return;
    }
    const status = e.step_status;
    if (!status) return;
    st.eventSeq.set(id, seq);
    let s = st.steps.get(id);
    if (!s) { s = { step_id: id, status, parent: null }; st.steps.set(id, s); }
    s.status = status;
    if (st.nodeIds.has(id)) {
      patchNode(id);
    } else {
      const parent = itemParent(id);
      if (parent) {
        s.parent = parent;
        if (!st.items.has(parent)) st.items.set(parent, new Map());
        st.items.get(parent).set(id, status);
        patchNode(parent);
      }
    }
    if (id === st.selected && panelCtx) setPanelStatus(status);
    if (TERMINAL.has(status)) scheduleRefetch();
  }

  // --- selection and the step panel
  function markSelected(id) {
    if (!st.dag) return;
    for (const g of st.dag.svg.querySelectorAll('g.dag-node.selected')) g.classList.remove('selected');
    if (!id) return;
    const nodeId = st.nodeIds.has(id) ? id : itemParent(id);
    const g = nodeId && st.dag.nodes.get(nodeId);
    if (g) g.classList.add('selected');
    return nodeId;
  }

  function select(id) {
    st.selected = id || null;
    const nodeId = markSelected(st.selected);
    const panel = document.getElementById('step-panel');
    if (!panel) return;
    if (!st.selected) {
      if (panelCtx) { panelCtx.dispose(); panelCtx = null; }
      panel.hidden = true;
      panel.removeAttribute('data-step-id');
      panel.innerHTML = '';
      document.querySelector('.run-body').classList.remove('with-panel');
      return;
    }
    loadPanel(st.selected, false);
    if (nodeId && st.dag) {
      const p = st.dag.pos.get(nodeId);
      if (p) st.dag.pz.focus(p[0], p[1]);
    }
  }

  function setPanelStatus(status) {
    const b = document.getElementById('step-status');
    if (!b || b.getAttribute('data-status') === status) return;
    b.className = `badge st-${cls(status)}`;
    b.setAttribute('data-status', status);
    b.textContent = status;
  }

  async function loadPanel(stepId, refresh) {
    const panel = document.getElementById('step-panel');
    document.querySelector('.run-body').classList.add('with-panel');
    if (!refresh || !panelCtx) {
      if (panelCtx) panelCtx.dispose();
      panelCtx = makeCtx();
      panel.hidden = false;
      panel.setAttribute('data-step-id', stepId);
      panel.innerHTML = panelSkeleton(stepId);
      startLogs(panelCtx, stepId);
    }
    const pctx = panelCtx;
    const known = st.steps.get(stepId);
    panelStatus = known ? known.status : null;
    let d;
    try {
      d = await api(`/api/runs/${enc(runId)}/steps/${enc(stepId)}`);
    } catch (e) {
      if (!pctx.alive) return;
      // A step that has not started has no record yet: say so in the panel, not as an error.
      if (e.status !== 404) showError(e);
      const sum = document.getElementById('step-summary');
      if (sum) sum.innerHTML = `<p class="error-text">${esc(e.message)}</p>`;
      return;
    }
    if (!pctx.alive) return;
    fillPanel(pctx, stepId, d);
  }

  function panelSkeleton(stepId) {
    return `
      <div class="panel-head">
        <h2 class="mono" title="${esc(stepId)}">${esc(stepId)}</h2>
        <span id="step-status" class="badge">…</span>
        <a class="close" href="#/runs/${enc(runId)}" title="Close" aria-label="Close">
          <svg width="14" height="14" viewBox="0 0 14 14" aria-hidden="true"><path d="M3 3l8 8M11 3l-8 8" stroke="currentColor" stroke-width="1.6"/></svg></a>
      </div>
      <dl id="step-summary" class="facts"></dl>
      <section id="step-error" class="step-error" hidden></section>
      <section><h3>Why</h3><div id="step-explain" class="muted">Loading…</div></section>
      <section><h3>Inputs</h3><table id="step-inputs" class="grid"></table></section>
      <section><h3>Outputs</h3><div id="step-outputs"></div></section>
      <section id="step-items-section" hidden><h3>Items</h3><table id="step-items" class="grid"></table></section>
      <section><h3>Logs</h3><pre id="step-logs" class="logs"></pre></section>
      <section><h3>Metadata</h3><table id="step-metadata" class="kv"></table></section>
      <section><h3>Attempts</h3><table id="step-attempts" class="grid"></table></section>`;
  }

  function fillPanel(pctx, stepId, d) {
    const s = d.step || {};
    panelStatus = s.status;
    const known = st.steps.get(stepId);
    // The panel's own fetch may be newer than the run snapshot; keep the graph in step.
    if (known && s.status && known.status !== s.status && !(st.eventSeq.get(stepId) > 0)) {
      known.status = s.status;
      patchNode(stepId);
    }
    setPanelStatus(s.status || '');
    const dur = elapsed(s.start_time, s.end_time, s.duration_seconds);
    document.getElementById('step-summary').innerHTML = [
      ['Attempt', esc(s.attempt ?? '—')],
      ['Started', `<span title="${esc(s.start_time || '')}">${esc(fmtTime(s.start_time))}</span>`],
      ['Ended', `<span title="${esc(s.end_time || '')}">${esc(fmtTime(s.end_time))}</span>`],
      ['Duration', esc(fmtDuration(dur) || '—')],
      s.cached_from ? ['Cached from', runLink(s.cached_from)] : null,
      s.parent ? ['Item of', `<a class="mono" href="${stepHref(runId, s.parent)}">${esc(s.parent)}</a>`] : null,
      s.cache_key ? ['Cache key', `<code title="${esc(s.cache_key)}">${esc(short(s.cache_key, 16))}</code>`] : null,
    ].filter(Boolean).map(([k, v]) => `<div><dt>${k}</dt><dd>${v}</dd></div>`).join('');

    const errEl = document.getElementById('step-error');
    if (s.error) {
      errEl.hidden = false;
      errEl.innerHTML = '<h3>Error</h3>' +
        `<div class="error-line"><span class="error-type">${esc(s.error.type || 'Error')}</span> ` +
        `<span class="error-message">${esc(s.error.message || '')}</span></div>` +
        (s.error.traceback ? `<pre class="traceback">${esc(s.error.traceback)}</pre>` : '');
    } else {
      errEl.hidden = true;
      errEl.innerHTML = '';
    }

    const x = d.explain || {};
    let ex = x.reason ? `<p class="reason">${esc(x.reason)}</p>` : '<p class="muted">No explanation.</p>';
    if (x.cached_from_run) ex += `<p>Outputs reused from run ${runLink(x.cached_from_run)}.</p>`;
    if (x.earlier_run) ex += `<p>Compared with run ${runLink(x.earlier_run)}.</p>`;
    if (x.differences && x.differences.length) {
      ex += '<table class="grid"><thead><tr><th>Component</th><th>Name</th><th>Now</th><th>Before</th></tr></thead><tbody>' +
        x.differences.map((df) => `<tr><td>${esc(df.component)}</td><td>${esc(df.name)}</td>` +
          `<td>${valueHtml(df.now)}</td><td>${valueHtml(df.before)}</td></tr>`).join('') + '</tbody></table>';
    }
    const exEl = document.getElementById('step-explain');
    exEl.classList.remove('muted');
    exEl.innerHTML = ex;

    const inputs = d.inputs || [];
    document.getElementById('step-inputs').innerHTML = inputs.length
      ? '<thead><tr><th>Name</th><th>Type</th><th>Source</th><th>Value</th></tr></thead><tbody>' +
        inputs.map((i) => {
          let v;
          if (i.step_id) {
            v = `<a class="step-link mono" href="${stepHref(runId, i.step_id)}">${esc(i.step_id)}</a>` +
              (i.output ? ` <span class="muted">→</span> <code>${esc(i.output)}</code>` : '');
            if (i.value !== null && i.value !== undefined) v += valueHtml(i.value);
          } else if (i.source === 'parameter' && typeof i.value === 'string' && st.run &&
                     st.run.parameters && Object.prototype.hasOwnProperty.call(st.run.parameters, i.value)) {
            // The binding names the run parameter; show which, and the value this run gave it.
            v = `<code>${esc(i.value)}</code> <span class="muted">=</span> ${valueHtml(st.run.parameters[i.value])}`;
          } else {
            v = valueHtml(i.value);
          }
          return `<tr class="input" data-input="${esc(i.name)}"><td class="mono">${esc(i.name)}</td>` +
            `<td><code>${esc(i.type || '')}</code></td><td>${esc(i.source || '')}</td><td>${v}</td></tr>`;
        }).join('') + '</tbody>'
      : '<tbody><tr class="empty"><td>No inputs.</td></tr></tbody>';

    const outs = s.outputs || [];
    const outEl = document.getElementById('step-outputs');
    outEl.innerHTML = outs.length ? outs.map((a) => `
      <div class="output" data-output="${esc(a.output)}" data-artifact-id="${esc(a.artifact_id)}">
        <div class="output-head">
          <strong class="mono">${esc(a.output)}</strong>
          <code class="muted">${esc(a.data_type || '')}</code>
          <span>${esc(fmtBytes(a.size_bytes))}</span>
          <code class="digest" title="${esc(a.digest || '')}">${esc(digestShort(a.digest))}</code>
          ${a.unsafe ? `<span class="tag warn" title="Stored with ${esc(a.materializer || 'pickle')}: loading it runs code">unsafe</span>` : ''}
          <a class="download" href="${esc(a.download || `/api/artifacts/${enc(a.artifact_id)}/download`)}" download>
            <svg width="12" height="12" viewBox="0 0 12 12" aria-hidden="true"><path d="M6 1v7M3 5l3 3 3-3M1 11h10" fill="none" stroke="currentColor" stroke-width="1.5"/></svg> download</a>
        </div>
        <div class="preview muted">Loading preview…</div>
      </div>`).join('')
      : `<p class="muted">${TERMINAL.has(s.status) ? 'No outputs.' : 'No outputs yet.'}</p>`;
    for (const a of outs) {
      const el = outEl.querySelector(`.output[data-artifact-id="${CSS.escape(String(a.artifact_id))}"] .preview`);
      if (el) loadPreview(pctx, a.artifact_id, el);
    }

    const items = [...st.steps.values()].filter((it) => it.parent === stepId);
    const itemsSec = document.getElementById('step-items-section');
    if (items.length) {
      itemsSec.hidden = false;
      const shown = items.slice(0, 500);
      document.getElementById('step-items').innerHTML =
        '<thead><tr><th>Item</th><th>Status</th><th class="num">Duration</th></tr></thead><tbody>' +
        shown.map((it) => `<tr><td><a class="mono" href="${stepHref(runId, it.step_id)}">${esc(it.step_id)}</a></td>` +
          `<td>${badge(it.status)}</td><td class="num">${esc(fmtDuration(it.duration_seconds))}</td></tr>`).join('') +
        (items.length > shown.length ? `<tr class="empty"><td colspan="3">and ${items.length - shown.length} more</td></tr>` : '') +
        '</tbody>';
    } else {
      itemsSec.hidden = true;
    }

    document.getElementById('step-metadata').innerHTML = kvTable(s.metadata, 'No metadata.');

    const attempts = d.attempts || [];
    document.getElementById('step-attempts').innerHTML = attempts.length
      ? '<thead><tr><th>#</th><th>Status</th><th>Started</th><th>Ended</th><th class="num">Duration</th><th>Message</th></tr></thead><tbody>' +
        attempts.map((t) => {
          const secs = t.start_time && t.end_time ? (Date.parse(t.end_time) - Date.parse(t.start_time)) / 1000 : null;
          return `<tr><td>${esc(t.attempt)}</td><td>${badge(t.status)}</td>${timeCell(t.start_time)}${timeCell(t.end_time)}` +
            `<td class="num">${esc(fmtDuration(secs))}</td><td class="msg">${esc(t.message || '')}</td></tr>`;
        }).join('') + '</tbody>'
      : '<tbody><tr class="empty"><td>No attempts yet.</td></tr></tbody>';
  }

  function startLogs(pctx, stepId) {
    const pre = document.getElementById('step-logs');
    let queue = [];
    let frame = 0;
    let lastAttempt = null;
    let done = false;
    let tries = 0;
    pctx.onCleanup(() => cancelAnimationFrame(frame));

    function flush() {
      frame = 0;
      if (!pctx.alive || !queue.length) return;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
      const frag = document.createDocumentFragment();
      for (const c of queue) {
        if (c.attempt !== undefined && c.attempt !== lastAttempt) {
          if (lastAttempt !== null) {
            const m = document.createElement('span');
            m.className = 'log-attempt';
            m.textContent = `── attempt ${c.attempt} ──\n`;
            frag.appendChild(m);
          }
          lastAttempt = c.attempt;
        }
        const span = document.createElement('span');
        span.className = c.stream === 'stderr' ? 'log-stderr' : 'log-stdout';
        span.textContent = c.text || '';
        frag.appendChild(span);
      }
      queue = [];
      pre.appendChild(frag);
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }

    function open() {
      const es = new EventSource(`/api/runs/${enc(runId)}/logs?step=${enc(stepId)}`);
      pctx.onCleanup(() => es.close());
      es.onmessage = (ev) => {
        let c;
        try { c = JSON.parse(ev.data); } catch { return; }
        queue.push(c);
        if (!frame) frame = requestAnimationFrame(flush);
      };
      es.addEventListener('end', () => {
        done = true;
        es.close();
        pre.setAttribute('data-ended', '');
      });
      es.onerror = (ev) => {
        es.close();
        if (done || !pctx.alive) return;
        const told = streamError(ev);
        if (told) {
          done = true;
          pre.setAttribute('data-ended', 'broken');
          showError(told);
          return;
        }
        tries += 1;
        if (tries > 5) { pre.setAttribute('data-ended', 'broken'); return; }
        // The stream replays its backlog on reconnect, so start the text over.
        pctx.later(1000 * tries, () => {
          queue = [];
          lastAttempt = null;
          pre.textContent = '';
          open();
        });
      };
    }
    open();
  }

  function loadPreview(pctx, artifactId, el) {
    api(`/api/artifacts/${enc(artifactId)}/preview`).then((p) => {
      if (!pctx.alive) return;
      el.classList.remove('muted');
      el.innerHTML = previewHtml(p);
    }).catch((e) => {
      if (!pctx.alive) return;
      el.classList.remove('muted');
      el.innerHTML = `<p class="error-text">Preview failed: ${esc(e.message)}</p>`;
      showError(e);
    });
  }

  // --- first load
  const t0 = performance.now();
  api(`/api/runs/${enc(runId)}`).then((data) => {
    if (!ctx.alive) return;
    const tData = performance.now();
    st.nodeIds = new Set(((data.graph && data.graph.nodes) || []).map((n) => n.id));
    st.run = data.run;
    st.canCancel = Boolean(data.can_cancel);
    st.canRetry = Boolean(data.can_retry);
    st.lastSeq = Number(data.last_sequence) || 0;
    applySteps(data.steps, st.lastSeq);
    app.innerHTML = `
      <div class="run-page">
        <div id="run-head" class="run-head"></div>
        <div class="run-body">
          <div class="dag-wrap" id="dag-host"></div>
          <aside id="step-panel" class="step-panel" hidden></aside>
        </div>
      </div>`;
    renderHead();
    const host = document.getElementById('dag-host');
    const graph = data.graph || { nodes: [], edges: [] };
    if (!graph.nodes || !graph.nodes.length) {
      host.innerHTML = '<svg id="dag" class="dag empty" style="height:80px"></svg><p class="muted pad">This run has no steps.</p>';
    } else {
      st.dag = renderDag(ctx, host, graph, nodeView, {
        selected: null,
        onSelect: (id) => {
          if (id === st.selected) return;
          location.hash = stepHref(runId, id);
        },
      });
      for (const id of st.nodeIds) {
        const v = nodeView(id);
        st.nodeKeys.set(id, `${v.status}|${v.line2}|${v.line3}`);
      }
    }
    app.querySelector('.run-head').addEventListener('click', onAction);
    ctx.listen(document, 'keydown', (e) => {
      if (e.key === 'Escape' && st.selected && !e.target.closest('input, select, textarea')) {
        location.hash = `#/runs/${enc(runId)}`;
      }
    });
    // Kept on the page for anyone measuring: fetch time, and time to build the page after it.
    app.dataset.fetchMs = (tData - t0).toFixed(1);
    app.dataset.renderMs = (performance.now() - tData).toFixed(1);
    if (st.selected) select(st.selected);
    if (!TERMINAL.has(st.run.status)) openEvents(); else st.ended = true;
    // Running steps' clocks: refresh the header duration while the run is live.
    ctx.every(1000, () => {
      if (st.run && !st.run.end_time && !document.hidden) {
        const dd = document.getElementById('run-duration');
        if (dd) setText(dd, fmtDuration(elapsed(st.run.create_time, null, st.run.duration_seconds)) || '—');
      }
    });
  }).catch((e) => {
    if (!ctx.alive) return;
    showError(e);
    app.innerHTML = `<div class="run-page"><h1>Run <span class="mono">${esc(runId)}</span></h1>` +
      `<p class="error-text">${esc(e.message)}</p><p><a href="#/runs">Back to runs</a></p></div>`;
  });

  async function onAction(e) {
    const b = e.target.closest('button');
    if (!b || (b.id !== 'cancel-run' && b.id !== 'retry-run')) return;
    b.disabled = true;
    try {
      if (b.id === 'cancel-run') {
        await post(`/api/runs/${enc(runId)}/cancel`);
        if (ctx.alive) scheduleRefetch();
      } else {
        const r = await post(`/api/runs/${enc(runId)}/retry`);
        if (ctx.alive && r && r.run_id) location.hash = `#/runs/${enc(r.run_id)}`;
      }
    } catch (err) {
      if (ctx.alive) { showError(err); b.disabled = false; }
    }
  }

  return {
    runId,
    select(id) { if (id !== st.selected) select(id); },
  };
}

function previewHtml(p) {
  const note = p.note ? `<p class="muted note">${esc(p.note)}</p>` : '';
  const cut = p.truncated ? '<p class="muted note">Preview truncated.</p>' : '';
  switch (p.kind) {
    case 'json':
      return `<pre class="json">${esc(jsonText(p.data))}</pre>${cut}${note}`;
    case 'text':
      return `<pre class="text">${esc(typeof p.data === 'string' ? p.data : jsonText(p.data))}</pre>${cut}${note}`;
    case 'table': {
      const t = p.data || {};
      const shape = t.shape || [];
      const cols = t.columns || [];
      const rows = t.rows || [];
      const index = Array.isArray(t.index) && t.index.length === rows.length ? t.index : null;
      const cell = (v) => `<td>${esc(v === null ? 'null' : typeof v === 'object' ? JSON.stringify(v) : v)}</td>`;
      return `<p class="muted shape">${esc(shape[0] ?? rows.length)} rows × ${esc(shape[1] ?? cols.length)} columns` +
        `${rows.length < (shape[0] ?? 0) ? ` (first ${rows.length} shown)` : ''}</p>` +
        '<div class="scroll-x"><table class="grid preview-table"><thead><tr>' + (index ? '<th></th>' : '') +
        cols.map((c) => `<th>${esc(c)}</th>`).join('') + '</tr></thead><tbody>' +
        rows.map((r, i) => '<tr>' + (index ? `<th class="index">${esc(index[i])}</th>` : '') +
          (Array.isArray(r) ? r : [r]).map(cell).join('') + '</tr>').join('') +
        `</tbody></table></div>${cut}${note}`;
    }
    case 'array': {
      const a = p.data || {};
      const vals = Array.isArray(a.values) && a.values.length && Array.isArray(a.values[0])
        ? a.values.map((r) => JSON.stringify(r)).join('\n') : JSON.stringify(a.values);
      return `<p class="muted shape">shape (${esc((a.shape || []).join(', '))}) · dtype ${esc(a.dtype || '?')}</p>` +
        `<pre class="array">${esc(vals)}</pre>${cut}${note}`;
    }
    default:
      return note || '<p class="muted note">No preview.</p>';
  }
}

// ---------------------------------------------------------------------------------------------
// Pipelines, versions, diffs

function pipelinesPage(ctx) {
  app.innerHTML = `<div class="page-head"><h1>Pipelines</h1></div>
    <table id="pipelines-table" class="grid"><thead><tr><th>Name</th><th>Description</th><th>Latest version</th><th class="num">Versions</th><th>Created</th></tr></thead>
    <tbody><tr class="empty"><td colspan="5">Loading…</td></tr></tbody></table>`;
  const tbody = app.querySelector('#pipelines-table tbody');
  guard(ctx, api('/api/pipelines')).then((d) => {
    if (!ctx.alive) return;
    const ps = d.pipelines || [];
    tbody.innerHTML = ps.length ? ps.map((p) =>
      `<tr class="pipeline-row" data-name="${esc(p.name)}"><td><a href="#/pipelines/${enc(p.name)}">${esc(p.name)}</a></td>` +
      `<td class="desc">${esc(p.description || '')}</td>` +
      `<td>${p.latest_version ? `<a class="mono" href="#/versions/${enc(p.latest_version)}" title="${esc(p.latest_version)}">${esc(short(p.latest_version))}</a>` : '—'}</td>` +
      `<td class="num">${esc(p.version_count ?? '')}</td>${timeCell(p.create_time)}</tr>`).join('')
      : '<tr class="empty"><td colspan="5">No pipelines registered yet.</td></tr>';
  }).catch(() => { tbody.innerHTML = '<tr class="empty"><td colspan="5">Could not load the pipelines.</td></tr>'; });
  tbody.addEventListener('click', (e) => {
    if (e.target.closest('a')) return;
    const tr = e.target.closest('tr.pipeline-row');
    if (tr) location.hash = `#/pipelines/${enc(tr.dataset.name)}`;
  });
}

function pipelinePage(ctx, name) {
  app.innerHTML = `<div class="page-head"><h1><a href="#/pipelines" class="crumb">Pipelines</a> / <span>${esc(name)}</span></h1>
      <a class="btn" href="#/runs" id="pipeline-runs">Runs</a></div>
    <p class="muted">Pick version A and version B to compare them.</p>
    <table id="versions-table" class="grid"><thead><tr><th title="Version A">A</th><th title="Version B">B</th><th>Version</th><th>Created</th><th>Description</th><th class="num">Steps</th></tr></thead>
    <tbody><tr class="empty"><td colspan="6">Loading…</td></tr></tbody></table>
    <div class="toolbar"><button type="button" id="diff-button" class="btn primary" disabled>Diff A → B</button></div>
    <div id="diff-host"></div>`;
  document.getElementById('pipeline-runs').addEventListener('click', (e) => {
    e.preventDefault();
    runsFilter.pipeline = name;
    runsFilter.token = '';
    runsFilter.stack = [];
    location.hash = '#/runs';
  });
  const tbody = app.querySelector('#versions-table tbody');
  const btn = document.getElementById('diff-button');
  let diffSeq = 0;

  function picked() {
    const a = app.querySelector('input[name="pick-a"]:checked');
    const b = app.querySelector('input[name="pick-b"]:checked');
    return [a && a.value, b && b.value];
  }
  function update() {
    const [a, b] = picked();
    btn.disabled = !(a && b && a !== b);
    const host = document.getElementById('diff-host');
    if (btn.disabled) { host.innerHTML = ''; return; }
    const mine = ++diffSeq;
    host.innerHTML = '<p class="muted">Comparing…</p>';
    api(`/api/versions/${enc(a)}/diff/${enc(b)}`).then((d) => {
      if (ctx.alive && mine === diffSeq) host.innerHTML = diffHtml(d);
    }).catch((e) => {
      if (ctx.alive && mine === diffSeq) { host.innerHTML = ''; showError(e); }
    });
  }
  btn.addEventListener('click', () => {
    const [a, b] = picked();
    if (a && b) location.hash = `#/diff/${enc(a)}/${enc(b)}`;
  });
  tbody.addEventListener('change', update);
  tbody.addEventListener('click', (e) => {
    if (e.target.closest('a, input, label')) return;
    const tr = e.target.closest('tr.version-row');
    if (tr) location.hash = `#/versions/${enc(tr.dataset.version)}`;
  });
  guard(ctx, api(`/api/pipelines/${enc(name)}/versions`)).then((d) => {
    if (!ctx.alive) return;
    const vs = d.versions || [];
    tbody.innerHTML = vs.length ? vs.map((v, i) =>
      `<tr class="version-row" data-version="${esc(v.version)}">` +
      `<td class="pick"><input type="radio" name="pick-a" class="pick-a" value="${esc(v.version)}" aria-label="Version A"${i === 1 ? ' checked' : ''}></td>` +
      `<td class="pick"><input type="radio" name="pick-b" class="pick-b" value="${esc(v.version)}" aria-label="Version B"${i === 0 && vs.length > 1 ? ' checked' : ''}></td>` +
      `<td><a class="mono" href="#/versions/${enc(v.version)}" title="${esc(v.version)}">${esc(short(v.version))}</a></td>` +
      `${timeCell(v.create_time)}<td class="desc">${esc(v.description || '')}</td><td class="num">${esc(v.steps ?? '')}</td></tr>`).join('')
      : '<tr class="empty"><td colspan="6">No versions.</td></tr>';
    update();
  }).catch(() => { tbody.innerHTML = '<tr class="empty"><td colspan="6">Could not load the versions.</td></tr>'; });
}

function versionPage(ctx, version) {
  app.innerHTML = `<div class="page-head"><h1>Version <span class="mono">${esc(version)}</span></h1></div>
    <div class="dag-wrap" id="dag-host"><p class="muted pad">Loading…</p></div>
    <h2>IR</h2><pre id="ir" class="ir"></pre>`;
  guard(ctx, api(`/api/versions/${enc(version)}`)).then((d) => {
    if (!ctx.alive) return;
    const head = app.querySelector('.page-head h1');
    head.innerHTML = `<a class="crumb" href="#/pipelines/${enc(d.pipeline || '')}">${esc(d.pipeline)}</a> / ` +
      `<span class="mono" title="${esc(d.version)}">${esc(d.version)}</span>`;
    const host = document.getElementById('dag-host');
    const graph = d.graph || { nodes: [], edges: [] };
    renderDag(ctx, host, graph, () => ({ status: '', line2: '', line3: '' }), {});
    document.getElementById('ir').textContent = jsonText(d.ir);
  }).catch((e) => {
    if (ctx.alive) document.getElementById('dag-host').innerHTML = `<p class="error-text pad">${esc(e.message)}</p>`;
  });
}

function diffValue(v) {
  if (v === null || v === undefined) return '<span class="muted">—</span>';
  return valueHtml(v);
}

function diffHtml(d) {
  const list = (ids, klass, sign) => (ids && ids.length)
    ? `<ul class="steps ${klass}">${ids.map((s) => `<li><span class="sign">${sign}</span> <span class="mono">${esc(s)}</span></li>`).join('')}</ul>`
    : '<p class="muted">None.</p>';
  const fields = (rows) => '<table class="grid diff-fields"><thead><tr><th>Path</th><th>A</th><th>B</th></tr></thead><tbody>' +
    rows.map((f) => `<tr><td class="mono">${esc(f.path)}</td><td class="a">${diffValue(f.a)}</td><td class="b">${diffValue(f.b)}</td></tr>`).join('') +
    '</tbody></table>';
  const changed = d.changed || [];
  const params = d.parameters || [];
  const same = !(d.added || []).length && !(d.removed || []).length && !changed.length && !params.length &&
    !(d.settings || []).length;
  return `<div id="diff" class="diff">
    <h2>Diff <a class="mono" href="#/versions/${enc(d.a)}" title="${esc(d.a)}">${esc(short(d.a))}</a> →
      <a class="mono" href="#/versions/${enc(d.b)}" title="${esc(d.b)}">${esc(short(d.b))}</a></h2>
    ${same ? '<p class="muted">The two versions are the same.</p>' : ''}
    <div class="diff-cols">
      <section><h3>Added steps</h3><div id="diff-added">${list(d.added, 'added', '+')}</div></section>
      <section><h3>Removed steps</h3><div id="diff-removed">${list(d.removed, 'removed', '−')}</div></section>
    </div>
    <section id="diff-changed"><h3>Changed steps</h3>${changed.length ? changed.map((c) =>
      `<div class="changed-step" data-step-id="${esc(c.step_id)}"><h4 class="mono">${esc(c.step_id)}</h4>${fields(c.fields || [])}</div>`).join('')
      : '<p class="muted">None.</p>'}</section>
    <section id="diff-parameters"><h3>Parameters</h3>${params.length ? fields(params) : '<p class="muted">No changes.</p>'}</section>
    ${d.settings && d.settings.length ? `<section id="diff-settings"><h3>Pipeline settings</h3>${fields(d.settings)}</section>` : ''}
  </div>`;
}

function diffPage(ctx, a, b) {
  app.innerHTML = '<div class="page-head"><h1>Diff</h1></div><div id="diff-host"><p class="muted">Comparing…</p></div>';
  guard(ctx, api(`/api/versions/${enc(a)}/diff/${enc(b)}`)).then((d) => {
    if (ctx.alive) document.getElementById('diff-host').innerHTML = diffHtml(d);
  }).catch((e) => {
    if (ctx.alive) document.getElementById('diff-host').innerHTML = `<p class="error-text">${esc(e.message)}</p>`;
  });
}

// ---------------------------------------------------------------------------------------------
// Stacks and builds

function stacksPage(ctx) {
  app.innerHTML = `<div class="page-head"><h1>Stacks</h1></div>
    <table id="stacks-table" class="grid"><thead><tr><th>Name</th><th>Active</th><th>Components</th></tr></thead>
    <tbody><tr class="empty"><td colspan="3">Loading…</td></tr></tbody></table>
    <h2>Components</h2>
    <table id="components-table" class="grid"><thead><tr><th>Name</th><th>Kind</th><th>Flavor</th><th>Config</th></tr></thead>
    <tbody><tr class="empty"><td colspan="4">Loading…</td></tr></tbody></table>`;
  guard(ctx, api('/api/stacks')).then((d) => {
    if (!ctx.alive) return;
    const stacks = d.stacks || [];
    const comps = d.components || [];
    app.querySelector('#stacks-table tbody').innerHTML = stacks.length ? stacks.map((s) =>
      `<tr class="stack-row${s.active ? ' active' : ''}" data-name="${esc(s.name)}"><td>${esc(s.name)}</td>` +
      `<td>${s.active ? '<span class="tag ok" title="The active stack">● active</span>' : ''}</td>` +
      `<td class="components">${Object.entries(s.components || {}).map(([kind, n]) =>
        `<div><span class="muted">${esc(kind)}:</span> ${esc(n)}</div>`).join('')}</td></tr>`).join('')
      : '<tr class="empty"><td colspan="3">No stacks.</td></tr>';
    app.querySelector('#components-table tbody').innerHTML = comps.length ? comps.map((c) =>
      `<tr class="component-row" data-name="${esc(c.name)}"><td>${esc(c.name)}</td><td>${esc(c.kind)}</td><td>${esc(c.flavor)}</td>` +
      `<td class="config">${Object.entries(c.config || {}).map(([k, v]) =>
        `<div><span class="k">${esc(k)}</span>=<span class="v">${esc(typeof v === 'string' ? v : JSON.stringify(v))}</span></div>`).join('')}</td></tr>`).join('')
      : '<tr class="empty"><td colspan="4">No components.</td></tr>';
  }).catch(() => {
    for (const t of app.querySelectorAll('tbody')) t.innerHTML = '<tr class="empty"><td colspan="4">Could not load the stacks.</td></tr>';
  });
}

function buildsPage(ctx) {
  app.innerHTML = `<div class="page-head"><h1>Builds</h1></div>
    <table id="builds-table" class="grid"><thead><tr><th>Key</th><th>Kind</th><th>Digest</th><th>Image</th><th class="num">Size</th><th>Source</th><th>Age</th><th>Status</th><th>Runs</th></tr></thead>
    <tbody><tr class="empty"><td colspan="9">Loading…</td></tr></tbody></table>`;
  guard(ctx, api('/api/builds')).then((d) => {
    if (!ctx.alive) return;
    const bs = d.builds || [];
    app.querySelector('#builds-table tbody').innerHTML = bs.length ? bs.map((b) =>
      `<tr class="build-row" data-key="${esc(b.key)}"><td><code title="${esc(b.key)}">${esc(short(b.key))}</code></td>` +
      `<td>${esc(b.kind)}</td><td><code title="${esc(b.digest || '')}">${esc(digestShort(b.digest))}</code></td>` +
      `<td class="image" title="${esc(b.image || '')}">${esc(b.image || '')}</td><td class="num">${esc(fmtBytes(b.size_bytes))}</td>` +
      `<td>${esc(b.source || '')}</td><td title="${esc(b.create_time || '')}">${esc(fmtAge(b.age_seconds))}</td>` +
      `<td>${badge(b.status)}</td><td class="runs">${(b.runs || []).map((r) => runLink(r, 8)).join(' ')}</td></tr>`).join('')
      : '<tr class="empty"><td colspan="9">No builds.</td></tr>';
  }).catch(() => {
    app.querySelector('#builds-table tbody').innerHTML = '<tr class="empty"><td colspan="9">Could not load the builds.</td></tr>';
  });
}

// ---------------------------------------------------------------------------------------------
// Routing

let current = null;   // {ctx, kind, page}

function parseHash() {
  let h = location.hash.replace(/^#\/?/, '');
  const q = h.indexOf('?');
  if (q >= 0) h = h.slice(0, q);
  return h.split('/').filter((p, i) => p !== '' || i === 0).map((p) => {
    try { return decodeURIComponent(p); } catch { return p; }
  });
}

function route() {
  const parts = parseHash();
  const [top] = parts;
  if (!top) { history.replaceState(null, '', '#/runs'); }
  if (top === 'runs' && parts[1] && current && current.kind === 'run' && current.page && current.page.runId === parts[1]) {
    const stepId = parts[2] === 'steps' && parts.length > 3 ? parts.slice(3).join('/') : null;
    current.page.select(stepId);
    return;
  }
  if (current) current.ctx.dispose();
  clearError();
  window.scrollTo(0, 0);
  const ctx = makeCtx();
  current = { ctx, kind: top || 'runs', page: null };
  for (const a of document.querySelectorAll('#nav a')) {
    const on = a.dataset.nav === (top === 'versions' || top === 'diff' ? 'pipelines' : top || 'runs');
    a.classList.toggle('active', on);
  }
  try {
    switch (top || 'runs') {
      case 'runs':
        if (parts[1]) {
          current.kind = 'run';
          const stepId = parts[2] === 'steps' && parts.length > 3 ? parts.slice(3).join('/') : null;
          current.page = runPage(ctx, parts[1], stepId);
          document.title = `Run ${short(parts[1])} · Plait`;
        } else {
          runsPage(ctx);
          document.title = 'Runs · Plait';
        }
        break;
      case 'pipelines':
        if (parts[1]) pipelinePage(ctx, parts.slice(1).join('/')); else pipelinesPage(ctx);
        document.title = 'Pipelines · Plait';
        break;
      case 'versions':
        versionPage(ctx, parts[1] || '');
        document.title = 'Version · Plait';
        break;
      case 'diff':
        diffPage(ctx, parts[1] || '', parts[2] || '');
        document.title = 'Diff · Plait';
        break;
      case 'stacks':
        stacksPage(ctx);
        document.title = 'Stacks · Plait';
        break;
      case 'builds':
        buildsPage(ctx);
        document.title = 'Builds · Plait';
        break;
      default:
        app.innerHTML = `<h1>Not found</h1><p>There is no page <code>${esc(location.hash)}</code>. <a href="#/runs">Go to the runs.</a></p>`;
    }
  } catch (e) {
    showError(e);
    app.innerHTML = '<p class="error-text">This page failed to render.</p>';
  }
}

window.addEventListener('hashchange', route);
window.addEventListener('error', (e) => {
  // Chromium reports a ResizeObserver that had more to say in one frame as an error; it is not.
  if (!e.error && /ResizeObserver/.test(String(e.message))) return;
  showError(e.error || e.message);
});
window.addEventListener('unhandledrejection', (e) => {
  // Promises the pages already reported through guard() rethrow; only show what nobody saw.
  if (e.reason instanceof ApiError) { e.preventDefault(); return; }
  showError(e.reason);
});

document.getElementById('sign-out').addEventListener('click', async () => {
  try {
    const s = await session();
    await fetch('/logout', { method: 'POST', credentials: 'same-origin', headers: { 'X-Plait-CSRF': s.csrf || '' } });
  } catch (e) {
    // Signed out either way: the login page is where this ends.
  }
  goLogin('/login');
});

session().then((s) => {
  const who = document.getElementById('whoami');
  who.textContent = s.name ? `${s.name} · ${s.role}` : s.role || '';
}).catch((e) => showError(e));

route();

})();
