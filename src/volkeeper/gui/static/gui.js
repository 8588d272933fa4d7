// volkeeper GUI: live regions over server-sent events. No framework, no build step.
//
// The page's <body data-live="VIEW"> names its view; /live?view=VIEW streams "region" events,
// each {id, html}: the new inner HTML of the element with that id.  A region is not replaced
// while a pointer is pressed inside it (the click would land on a node that is gone); the
// newest HTML is applied when the pointer is released, and a <details data-key> that was open
// stays open.  If the stream breaks, the browser's
// EventSource reconnects by itself; meanwhile a banner says the state shown may be old.
(function () {
  "use strict";
  var view = document.body.getAttribute("data-live");
  if (!view || !window.EventSource) { return; }
  var banner = document.getElementById("gui-link");
  var pending = {};
  var pressed = null;

  function apply(id, html) {
    var element = document.getElementById(id);
    if (!element) { return; }
    if (pressed && element.contains(pressed)) { pending[id] = html; return; }
    var open = Array.prototype.map.call(
      element.querySelectorAll("details[open][data-key]"),
      function (details) { return details.getAttribute("data-key"); });
    element.innerHTML = html;
    open.forEach(function (key) {
      var details = element.querySelector('details[data-key="' + CSS.escape(key) + '"]');
      if (details) { details.open = true; }
    });
  }

  document.addEventListener("pointerdown", function (event) { pressed = event.target; }, true);
  document.addEventListener("pointerup", function () {
    window.setTimeout(function () {
      pressed = null;
      var ids = Object.keys(pending);
      ids.forEach(function (id) { var html = pending[id]; delete pending[id]; apply(id, html); });
    }, 0);
  }, true);

  var source = new EventSource("/live?view=" + encodeURIComponent(view));
  source.addEventListener("region", function (event) {
    var region = JSON.parse(event.data);
    apply(region.id, region.html);
  });
  source.addEventListener("open", function () {
    banner.hidden = true;
    document.body.setAttribute("data-live-state", "open");
  });
  source.addEventListener("error", function () {
    banner.hidden = false;
    document.body.setAttribute("data-live-state", "reconnecting");
  });
})();
