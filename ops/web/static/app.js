// The installer's page: live fields from the server-sent events (/events) and the
// power plot, drawn as SVG by hand. No framework; the Content-Security-Policy
// allows only this file as script.
"use strict";
(function () {
  var SVG = "http://www.w3.org/2000/svg";
  var HOUR = 3600;
  var plot = { hour: [], session: [], sessionTx: null, interval: 5 };

  function setFields(fields) {
    var nodes = document.querySelectorAll("[data-f]");
    for (var i = 0; i < nodes.length; i++) {
      var name = nodes[i].getAttribute("data-f");
      if (Object.prototype.hasOwnProperty.call(fields, name) &&
          nodes[i].textContent !== fields[name]) {
        nodes[i].textContent = fields[name];
      }
    }
  }

  function setRows(id, rows) {
    var table = document.getElementById(id);
    if (!table) { return; }
    var body = table.tBodies[0];
    while (body.firstChild) { body.removeChild(body.firstChild); }
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      row.forEach(function (cell) {
        var td = document.createElement("td");
        td.textContent = cell;
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    var empty = table.parentNode.querySelector(".empty");
    if (empty) { empty.classList.toggle("hidden", rows.length > 0); }
  }

  function el(name, attrs, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function nice(max) {
    if (!(max > 0)) { return 1; }
    var step = Math.pow(10, Math.floor(Math.log10(max)));
    var top = Math.ceil(max / step) * step;
    return top;
  }

  function clock(t) {
    var d = new Date(t * 1000);
    return ("0" + d.getHours()).slice(-2) + ":" + ("0" + d.getMinutes()).slice(-2);
  }

  // Points are [t (s since the epoch), power W or null, offered A, transaction].
  function draw(id, points, span) {
    var box = document.getElementById(id);
    if (!box) { return; }
    while (box.firstChild) { box.removeChild(box.firstChild); }
    if (points.length < 2) {
      var p = document.createElement("p");
      p.className = "empty";
      p.textContent = points.length ? "collecting data" : "no data yet";
      box.appendChild(p);
      return;
    }
    var w = 600, h = 180, l = 38, r = 34, t = 8, b = 20;
    var t1 = points[points.length - 1][0];
    var t0 = span ? t1 - span : points[0][0];
    if (t1 - t0 < 1) { t0 = t1 - 1; }
    var kw = nice(Math.max.apply(null, points.map(function (q) { return (q[1] || 0) / 1000; })));
    var amps = nice(Math.max.apply(null, points.map(function (q) { return q[2] || 0; })));
    var svg = el("svg", { viewBox: "0 0 " + w + " " + h, role: "img",
      "aria-label": "power and offered current" });
    function x(tt) { return l + (tt - t0) / (t1 - t0) * (w - l - r); }
    function yk(v) { return h - b - v / kw * (h - t - b); }
    function ya(v) { return h - b - v / amps * (h - t - b); }
    for (var i = 0; i <= 4; i++) {
      var gy = t + i * (h - t - b) / 4;
      svg.appendChild(el("line", { x1: l, x2: w - r, y1: gy, y2: gy, "class": "grid" }));
      svg.appendChild(el("text", { x: l - 4, y: gy + 4, "text-anchor": "end" },
        String(+(kw * (4 - i) / 4).toFixed(2))));
      svg.appendChild(el("text", { x: w - r + 4, y: gy + 4 }, String(+(amps * (4 - i) / 4).toFixed(2))));
    }
    svg.appendChild(el("text", { x: l, y: h - 4 }, clock(t0)));
    svg.appendChild(el("text", { x: w - r, y: h - 4, "text-anchor": "end" }, clock(t1)));
    var pw = [], of = [];
    points.forEach(function (q) {
      if (q[0] < t0) { return; }
      if (q[1] !== null) { pw.push(x(q[0]).toFixed(1) + "," + yk(q[1] / 1000).toFixed(1)); }
      of.push(x(q[0]).toFixed(1) + "," + ya(q[2]).toFixed(1));
    });
    svg.appendChild(el("polyline", { points: of.join(" "), "class": "offered" }));
    svg.appendChild(el("polyline", { points: pw.join(" "), "class": "power" }));
    box.appendChild(svg);
  }

  function redraw() {
    draw("plot-session", plot.session, 0);
    draw("plot-hour", plot.hour, HOUR);
  }

  function addPoint(q) {
    plot.hour.push(q);
    var cut = q[0] - HOUR;
    while (plot.hour.length && plot.hour[0][0] < cut) { plot.hour.shift(); }
    if (q[3] !== null) {
      if (q[3] !== plot.sessionTx) { plot.sessionTx = q[3]; plot.session = []; }
      plot.session.push(q);
      // A long session keeps its whole span at half the resolution, as the server does.
      if (plot.session.length > 1440) {
        plot.session = plot.session.filter(function (_, i) { return i % 2 === 0; });
      }
    }
  }

  function live(state, text) {
    var p = document.getElementById("live");
    if (!p) { return; }
    p.setAttribute("data-state", state);
    document.getElementById("live-text").textContent = text;
  }

  function start() {
    if (!window.EventSource || !document.querySelector("[data-f]")) { return; }
    var source = new EventSource("/events");
    source.onopen = function () { live("live", "live"); };
    source.onerror = function () { live("lost", "reconnecting"); };
    function on(name, fn) {
      source.addEventListener(name, function (e) { fn(JSON.parse(e.data)); });
    }
    on("status", function (d) { setFields(d.fields); live("live", "live, " + d.at); });
    on("faults", function (rows) { setRows("faults", rows); });
    on("transactions", function (rows) { setRows("transactions", rows); });
    on("plot", function (d) {
      plot.hour = d.hour; plot.session = d.session; plot.sessionTx = d.session_tx;
      plot.interval = d.interval; redraw();
    });
    on("point", function (q) { addPoint(q); redraw(); });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
