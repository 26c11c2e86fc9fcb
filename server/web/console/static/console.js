// Live updates for the operator console: every few seconds, fetch this same page and swap in its
// fresh [data-live] regions (by id). No eval, no innerHTML of strings: the server's HTML is parsed
// into an inert document (DOMParser runs no script) and its nodes are imported. CSP allows this file only.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var every = live ? parseInt(live.getAttribute("data-interval"), 10) || 3000 : 3000;

  function parse(text) {
    return new DOMParser().parseFromString(text, "text/html");
  }

  function swap(fresh) {
    var regions = document.querySelectorAll("[data-live][id]");
    for (var i = 0; i < regions.length; i++) {
      var old = regions[i];
      if (old.contains(document.activeElement) && document.activeElement !== document.body) continue;
      var next = fresh.getElementById(old.id);
      if (next) old.replaceWith(document.importNode(next, true));
    }
  }

  function loadInto(region) {
    var src = region.getAttribute("data-src");
    if (!src) return;
    fetch(src, { credentials: "same-origin", headers: { "X-Console-Live": "1" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) {
        var body = parse(text).body;
        region.replaceChildren.apply(region, Array.prototype.map.call(body.childNodes, function (n) {
          return document.importNode(n, true);
        }));
      })
      .catch(function () {});
  }

  function tick() {
    if (document.hidden || !document.querySelector("[data-live][id]")) return;
    fetch(location.href, { credentials: "same-origin", headers: { "X-Console-Live": "1" }, redirect: "error" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) {
        swap(parse(text));
        if (live) live.textContent = "live: updated " + new Date().toLocaleTimeString();
      })
      .catch(function () { if (live) live.textContent = "live: paused (no answer)"; });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var sources = document.querySelectorAll("[data-src]");
    for (var i = 0; i < sources.length; i++) loadInto(sources[i]);
    setInterval(tick, every);
  });
})();
