// The gallery of a salient report: filters, sort, thresholds and pages over the whole job, from data files
// loaded on demand (storage/report/pages.py writes them; the first page is embedded).
// Files are scripts inserted as script elements that call salientReport.receive(name, data): fetch() of file://
// URLs is refused by Chromium, a script tag loads from disk and over http alike.
// Every value from the data goes into the page through textContent or setAttribute, never as HTML.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const AT = { score: 2, deletion_auc: 4, insertion_auc: 5, drop: 6, energy_in_box: 8, border_energy: 9,
    pointing_game: 10, localization_iou: 11, drawn: 12 };
  const SCAN = 200; // list entries tested per step when several filters combine
  const KEEP = 400; // files kept in memory
  const controls = {
    status: document.getElementById("f-status"),
    method: document.getElementById("f-method"),
    cls: document.getElementById("f-class"),
    correct: document.getElementById("f-correct"),
    sort: document.getElementById("f-sort"),
    min: document.getElementById("f-min"),
    max: document.getElementById("f-max"),
  };
  const gallery = document.getElementById("gallery");
  const countLabel = document.getElementById("count");
  const pageLabel = document.getElementById("page");
  const prev = document.getElementById("prev");
  const next = document.getElementById("next");

  // --- files ---------------------------------------------------------------------------------------------
  const waiting = new Map();
  const cache = new Map();
  const report = {
    receive(name, payload) {
      const w = waiting.get(name);
      if (w) { waiting.delete(name); w(payload); }
    },
    settled: () => current,
  };
  window.salientReport = report;

  function load(name) {
    if (cache.has(name)) {
      const hit = cache.get(name);
      cache.delete(name);
      cache.set(name, hit);
      return hit;
    }
    const promise = new Promise((resolve, reject) => {
      waiting.set(name, resolve);
      const tag = document.createElement("script");
      tag.src = "data/" + name + ".js";
      tag.onload = () => {
        tag.remove();
        if (waiting.delete(name)) reject(new Error("data/" + name + ".js did not deliver " + name));
      };
      tag.onerror = () => { tag.remove(); waiting.delete(name); reject(new Error("cannot load data/" + name + ".js")); };
      document.head.appendChild(tag);
    });
    promise.catch(() => cache.delete(name));
    cache.set(name, promise);
    if (cache.size > KEEP) cache.delete(cache.keys().next().value);
    return promise;
  }
  const pad = (n, width) => String(n).padStart(width, "0");
  const pageFile = (p) => "page-" + pad(p, 6);
  cache.set(pageFile(0), Promise.resolve(data.first));

  // The cards of these image numbers, in this order, each with its page's shard links.
  async function cardsOf(numbers) {
    const pages = Array.from(new Set(numbers.map((n) => Math.floor(n / data.pageSize))));
    const loaded = new Map(await Promise.all(pages.map(async (p) => [p, await load(pageFile(p))])));
    return numbers.map((n) => {
      const page = loaded.get(Math.floor(n / data.pageSize));
      return { n: n, card: page.cards[n % data.pageSize], shards: page.shards };
    });
  }

  // Entries [from, to) of a view: image numbers and, for a sort, their values.
  async function entries(key, from, to) {
    if (key === null) {
      const n = [];
      for (let i = from; i < to; i++) n.push(i);
      return { n: n, v: null };
    }
    const first = Math.floor(from / data.chunk), last = Math.floor((to - 1) / data.chunk);
    const chunks = [];
    for (let c = first; c <= last; c++) chunks.push(load(key + "-" + pad(c, 4)));
    const parts = await Promise.all(chunks);
    const n = [].concat(...parts.map((p) => p.n));
    const v = parts[0] && parts[0].v ? [].concat(...parts.map((p) => p.v)) : null;
    const skip = from - first * data.chunk;
    return { n: n.slice(skip, skip + to - from), v: v && v.slice(skip, skip + to - from) };
  }

  // The first position of a sorted view whose value passes `test` (false for a prefix, then true).
  async function firstPassing(key, test) {
    const view = data.views[key];
    let c = view.bounds.findIndex((b) => test(b[1]));
    if (c < 0) return view.count;
    const chunk = await load(key + "-" + pad(c, 4));
    let lo = 0, hi = chunk.v.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (test(chunk.v[mid])) hi = mid; else lo = mid + 1;
    }
    return c * data.chunk + lo;
  }

  // --- controls ------------------------------------------------------------------------------------------
  function option(select, value, label) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    select.appendChild(o);
  }
  data.methods.forEach((m, i) => option(controls.method, String(i), m));
  Object.entries(data.classes)
    .sort((a, b) => a[1].localeCompare(b[1]))
    .forEach(([id, name]) => option(controls.cls, id, name));

  function state() {
    const number = (input) => (input.value === "" ? null : Number(input.value));
    return {
      status: controls.status.value,
      method: Number(controls.method.value),
      cls: Number(controls.cls.value),
      correct: controls.correct ? controls.correct.value : "",
      sort: controls.sort.value,
      min: number(controls.min),
      max: number(controls.max),
    };
  }

  // Which list to walk and what to test on each card: one filter or sort alone is read straight from its
  // list (exact count at once); several are combined by walking the smallest list (the sort's when sorting).
  async function plan(s) {
    const filters = [];
    if (s.status) filters.push("status-" + s.status);
    if (s.correct) filters.push("correct-" + s.correct);
    if (s.method >= 0) filters.push("method-" + s.method);
    if (s.cls >= 0) filters.push("class-" + s.cls);
    const size = (key) => (data.views[key] ? data.views[key].count : 0);
    let key = null, from = 0, to = data.images, checked = filters;
    if (s.sort !== "order") {
      const method = s.method >= 0 ? s.method : data.methods.findIndex((m, i) => data.views["sort-" + i + "-" + s.sort]);
      key = "sort-" + method + "-" + s.sort;
      if (!data.views[key]) return { key: null, from: 0, to: 0, checks: [] };
      const view = data.views[key];
      to = view.count;
      const [lo, hi] = [s.min, s.max];
      if (view.higherFirst) {
        if (hi !== null) from = await firstPassing(key, (v) => v <= hi);
        if (lo !== null) to = await firstPassing(key, (v) => v < lo);
      } else {
        if (lo !== null) from = await firstPassing(key, (v) => v >= lo);
        if (hi !== null) to = await firstPassing(key, (v) => v > hi);
      }
      to = Math.max(from, to);
      checked = filters.filter((f) => f !== "method-" + method);
    } else if (filters.length) {
      key = filters.reduce((a, b) => (size(a) <= size(b) ? a : b));
      to = size(key);
      checked = filters.filter((f) => f !== key);
    }
    if (key !== null && !data.views[key]) to = 0;
    const tests = [];
    if (checked.some((f) => f.startsWith("status-"))) tests.push((c) => c.s === s.status);
    if (checked.some((f) => f.startsWith("correct-"))) tests.push((c) => String(c.k) === s.correct);
    if (s.method >= 0 && s.cls >= 0 || checked.some((f) => f.startsWith("method-") || f.startsWith("class-"))) {
      tests.push((c) => c.x.some((x) => (s.method < 0 || x[0] === s.method) && (s.cls < 0 || x[1] === s.cls)));
    }
    return { key: key, from: from, to: to, checks: tests };
  }

  // --- the view: its plan, the matches found so far, the page shown ------------------------------------------
  let view = null;
  let page = 0;
  let generation = 0;
  let current = Promise.resolve();

  function matches(v, card) { return v.checks.every((test) => test(card)); }

  // Walk the list until the page is full (or the list ends).
  async function fill(v, upto) {
    while (v.found.length < upto && v.scanned < v.to) {
      const end = Math.min(v.to, v.scanned + SCAN);
      const got = await entries(v.key, v.scanned, end);
      for (const entry of await cardsOf(got.n)) if (matches(v, entry.card)) v.found.push(entry.n);
      v.scanned = end;
    }
  }

  async function shownPage(v) {
    const start = page * data.pageSize;
    if (v.checks.length === 0) {
      const to = Math.min(v.to, v.from + start + data.pageSize);
      return cardsOf((await entries(v.key, v.from + start, Math.max(v.from + start, to))).n);
    }
    await fill(v, start + data.pageSize);
    return cardsOf(v.found.slice(start, start + data.pageSize));
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  const className = (id) => (data.classes[id] !== undefined ? data.classes[id] : "class " + id);

  function explanationFigure(entry, x) {
    const card = entry.card;
    const fig = el("figure");
    const link = el("a");
    if (card.h !== null && entry.shards[card.h]) link.setAttribute("href", entry.shards[card.h]);
    link.setAttribute("title", "the raw maps (this batch's shard)");
    if (card.p && x[AT.drawn]) {
      const img = el("img");
      img.setAttribute("src", "pictures/" + card.p + "-" + x[0] + "-" + x[1] + ".png");
      img.setAttribute("loading", "lazy");
      img.setAttribute("alt", data.methods[x[0]] + " " + className(x[1]));
      link.appendChild(img);
    } else {
      link.appendChild(el("span", "missing", card.p ? "overlay missing" : "not drawn in this report"));
    }
    fig.appendChild(link);
    const caption = el("figcaption");
    caption.appendChild(el("b", null, data.methods[x[0]]));
    caption.appendChild(el("span", "cls", className(x[1]) + " " + (x[AT.score] * 100).toFixed(1) + "%"));
    const m = [];
    if (x[AT.deletion_auc] !== null) m.push("del " + x[AT.deletion_auc].toFixed(3));
    if (x[AT.insertion_auc] !== null) m.push("ins " + x[AT.insertion_auc].toFixed(3));
    if (x[AT.drop] !== null) m.push("drop " + (x[AT.drop] * 100).toFixed(0) + "%");
    if (x[AT.energy_in_box] !== null) m.push("in box " + x[AT.energy_in_box].toFixed(3));
    if (x[AT.border_energy] !== null) m.push("border " + x[AT.border_energy].toFixed(3));
    if (x[AT.localization_iou] !== null) m.push("IoU " + x[AT.localization_iou].toFixed(3));
    if (m.length) caption.appendChild(el("span", "metrics", m.join(" · ")));
    fig.appendChild(caption);
    return fig;
  }

  function cardElement(entry, s) {
    const card = entry.card;
    const div = el("div", "card " + card.s);
    div.setAttribute("data-status", card.s);
    div.setAttribute("data-number", String(entry.n));
    const head = el("div", "head");
    const name = el("span", "name", card.n);
    name.setAttribute("title", card.n);
    head.appendChild(name);
    if (card.l !== null) {
      head.appendChild(el("span", "badge " + (card.k ? "done" : "failed"), "label " + className(card.l)));
    }
    head.appendChild(el("span", "badge " + card.s, card.s));
    div.appendChild(head);
    const row = el("div", "row");
    if (card.p) {
      const thumb = el("img", "thumb");
      thumb.setAttribute("src", "pictures/" + card.p + ".jpg");
      thumb.setAttribute("loading", "lazy");
      thumb.setAttribute("alt", card.n);
      row.appendChild(thumb);
    }
    card.x.filter((x) => (s.method < 0 || x[0] === s.method) && (s.cls < 0 || x[1] === s.cls))
      .forEach((x) => row.appendChild(explanationFigure(entry, x)));
    div.appendChild(row);
    if (card.e) div.appendChild(el("p", "error", card.e));
    return div;
  }

  async function render(mine) {
    const v = view;
    const shown = await shownPage(v);
    if (mine !== generation) return;
    const fragment = document.createDocumentFragment();
    shown.forEach((entry) => fragment.appendChild(cardElement(entry, v.state)));
    gallery.replaceChildren(fragment);
    const exact = v.checks.length === 0 || v.scanned >= v.to;
    const count = v.checks.length === 0 ? v.to - v.from : v.found.length;
    const pages = Math.max(1, Math.ceil(count / data.pageSize));
    countLabel.textContent = (exact ? "" : "at least ") + count + " of " + data.images + " images";
    countLabel.setAttribute("data-count", String(count));
    countLabel.setAttribute("data-exact", exact ? "1" : "0");
    pageLabel.textContent = "page " + (page + 1) + " of " + (exact ? pages : "at least " + pages);
    prev.disabled = page === 0;
    next.disabled = exact ? page >= pages - 1 : false;
    writeHash();
  }

  function show(task) {
    const mine = ++generation;
    gallery.setAttribute("aria-busy", "true");
    current = task(mine).catch((error) => {
      console.error(String(error));
    }).finally(() => {
      if (mine === generation) {
        gallery.setAttribute("aria-busy", "false");
        document.body.setAttribute("data-ready", "1");
        if (report.firstRender === undefined) report.firstRender = performance.now();
      }
    });
    return current;
  }

  function apply(keepPage) {
    const s = state();
    const sorted = s.sort !== "order";
    controls.min.disabled = controls.max.disabled = !sorted;
    if (!sorted) s.min = s.max = null;
    return show(async (mine) => {
      const p = await plan(s);
      if (mine !== generation) return;
      view = Object.assign(p, { state: s, found: [], scanned: p.from });
      if (!keepPage) page = 0;
      await render(mine);
    });
  }

  // The view lives in the address (#status=failed&class=3&page=2) so it can be linked.
  function writeHash() {
    const params = new URLSearchParams();
    const s = view.state;
    if (s.status) params.set("status", s.status);
    if (s.method >= 0) params.set("method", String(s.method));
    if (s.cls >= 0) params.set("class", String(s.cls));
    if (s.correct) params.set("correct", s.correct);
    if (s.sort !== "order") params.set("sort", s.sort);
    if (s.min !== null) params.set("min", String(s.min));
    if (s.max !== null) params.set("max", String(s.max));
    if (page) params.set("page", String(page + 1));
    history.replaceState(null, "", params.toString() ? "#" + params.toString() : location.pathname);
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const set = (select, value) => {
      if (select && value !== null && Array.from(select.options).some((o) => o.value === value)) select.value = value;
    };
    set(controls.status, params.get("status"));
    set(controls.method, params.get("method"));
    set(controls.cls, params.get("class"));
    set(controls.correct, params.get("correct"));
    set(controls.sort, params.get("sort"));
    for (const [input, name] of [[controls.min, "min"], [controls.max, "max"]]) {
      const value = params.get(name);
      if (value !== null && !Number.isNaN(Number(value))) input.value = value;
    }
    page = Math.max(0, (Number(params.get("page")) || 1) - 1);
  }

  Object.values(controls).forEach((c) => c && c.addEventListener("change", () => apply(false)));
  prev.addEventListener("click", () => { page = Math.max(0, page - 1); show(render); });
  next.addEventListener("click", () => { page += 1; show(render); });
  readHash();
  apply(true);
})();
