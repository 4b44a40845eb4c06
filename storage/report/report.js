// The gallery of a salient report: filters, sort and pages, rendered from the embedded JSON.
// Every value from the data goes into the page through textContent or setAttribute, never as HTML.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const METRIC_AT = { deletion_auc: 6, insertion_auc: 7, drop: 8 };
  const LOWER_IS_BETTER = { deletion_auc: true, drop: true };
  const controls = {
    status: document.getElementById("f-status"),
    method: document.getElementById("f-method"),
    cls: document.getElementById("f-class"),
    sort: document.getElementById("f-sort"),
  };
  const gallery = document.getElementById("gallery");
  const countLabel = document.getElementById("count");
  const pageLabel = document.getElementById("page");
  let page = 0;
  let shown = [];

  function option(select, value, label) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    select.appendChild(o);
  }
  data.methods.forEach((m, i) => option(controls.method, String(i), m));
  data.classes
    .map((c, i) => [c, i])
    .sort((a, b) => a[0].localeCompare(b[0]))
    .forEach(([c, i]) => option(controls.cls, String(i), c));

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  function visibleExplanations(card, method, cls) {
    return card.x.filter((x) => (method < 0 || x[0] === method) && (cls < 0 || x[1] === cls));
  }

  function sortValue(entry, key) {
    const first = entry.x[0];
    if (!first) return null;
    return key === "score" ? first[2] : first[METRIC_AT[key]];
  }

  function apply() {
    const status = controls.status.value;
    const method = Number(controls.method.value);
    const cls = Number(controls.cls.value);
    const narrowed = method >= 0 || cls >= 0;
    shown = [];
    data.cards.forEach((card, index) => {
      if (status && card.s !== status) return;
      const x = visibleExplanations(card, method, cls);
      if (narrowed && x.length === 0) return;
      shown.push({ card: card, x: x, index: index });
    });
    const key = controls.sort.value;
    if (key !== "order") {
      // Higher first, except metrics where lower is better; entries without a value go last.
      const sign = key === "score" || !LOWER_IS_BETTER[key] ? -1 : 1;
      shown.sort((a, b) => {
        const va = sortValue(a, key), vb = sortValue(b, key);
        if (va === null || va === undefined) return vb === null || vb === undefined ? a.index - b.index : 1;
        if (vb === null || vb === undefined) return -1;
        return sign * (va - vb) || a.index - b.index;
      });
    }
    page = 0;
    writeHash();
    render();
  }

  function explanationFigure(x) {
    const fig = el("figure");
    const link = el("a");
    if (x[5]) link.setAttribute("href", x[5]);
    link.setAttribute("title", "raw map (.npy)");
    if (x[4]) {
      const img = el("img");
      img.setAttribute("src", x[4]);
      img.setAttribute("loading", "lazy");
      img.setAttribute("alt", data.methods[x[0]] + " " + data.classes[x[1]]);
      link.appendChild(img);
    } else {
      link.appendChild(el("span", "missing", "overlay missing"));
    }
    fig.appendChild(link);
    const caption = el("figcaption");
    caption.appendChild(el("b", null, data.methods[x[0]]));
    caption.appendChild(el("span", "cls", data.classes[x[1]] + " " + (x[2] * 100).toFixed(1) + "%"));
    const m = [];
    if (x[6] !== null) m.push("del " + x[6].toFixed(3));
    if (x[7] !== null) m.push("ins " + x[7].toFixed(3));
    if (x[8] !== null) m.push("drop " + (x[8] * 100).toFixed(0) + "%");
    if (m.length) caption.appendChild(el("span", "metrics", m.join(" · ")));
    fig.appendChild(caption);
    return fig;
  }

  function cardElement(entry) {
    const card = entry.card;
    const div = el("div", "card " + card.s);
    div.setAttribute("data-status", card.s);
    const head = el("div", "head");
    const name = el("span", "name", card.n);
    name.setAttribute("title", card.n);
    head.appendChild(name);
    head.appendChild(el("span", "badge " + card.s, card.s));
    div.appendChild(head);
    const row = el("div", "row");
    if (card.t) {
      const thumb = el("img", "thumb");
      thumb.setAttribute("src", card.t);
      thumb.setAttribute("loading", "lazy");
      thumb.setAttribute("alt", card.n);
      row.appendChild(thumb);
    }
    entry.x.forEach((x) => row.appendChild(explanationFigure(x)));
    div.appendChild(row);
    if (card.e) div.appendChild(el("p", "error", card.e));
    return div;
  }

  function render() {
    const pages = Math.max(1, Math.ceil(shown.length / data.pageSize));
    page = Math.min(page, pages - 1);
    const fragment = document.createDocumentFragment();
    shown.slice(page * data.pageSize, (page + 1) * data.pageSize).forEach((e) => fragment.appendChild(cardElement(e)));
    gallery.replaceChildren(fragment);
    countLabel.textContent = shown.length + " of " + data.cards.length + " images";
    countLabel.setAttribute("data-count", String(shown.length));
    pageLabel.textContent = "page " + (page + 1) + " of " + pages;
    document.getElementById("prev").disabled = page === 0;
    document.getElementById("next").disabled = page >= pages - 1;
  }

  // Filters live in the address (#status=failed&class=3) so a filtered view can be linked.
  function writeHash() {
    const params = new URLSearchParams();
    if (controls.status.value) params.set("status", controls.status.value);
    if (controls.method.value !== "-1") params.set("method", controls.method.value);
    if (controls.cls.value !== "-1") params.set("class", controls.cls.value);
    if (controls.sort.value !== "order") params.set("sort", controls.sort.value);
    history.replaceState(null, "", params.toString() ? "#" + params.toString() : location.pathname);
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const set = (select, value) => {
      if (value !== null && Array.from(select.options).some((o) => o.value === value)) select.value = value;
    };
    set(controls.status, params.get("status"));
    set(controls.method, params.get("method"));
    set(controls.cls, params.get("class"));
    set(controls.sort, params.get("sort"));
  }

  Object.values(controls).forEach((c) => c.addEventListener("change", apply));
  document.getElementById("prev").addEventListener("click", () => { page -= 1; render(); });
  document.getElementById("next").addEventListener("click", () => { page += 1; render(); });
  readHash();
  apply();
})();
