"use strict";(self.rspackChunkdash_distributed_jupyterlab=self.rspackChunkdash_distributed_jupyterlab||[]).push([[700],{646(t,e,a){var o=a(601),r=a.n(o),n=a(314),i=(a.n(n))()(r());i.push([t.id,`/* DASH in JupyterLab: theme variables only, so light, dark and high-contrast themes apply. */

.dash-StatusItem {
  display: flex;
  align-items: center;
}

.dash-StatusItem-button {
  background: none;
  border: none;
  color: var(--jp-ui-font-color1);
  cursor: pointer;
  font-family: var(--jp-ui-font-family);
  font-size: var(--jp-ui-font-size1);
  line-height: 24px;
  padding: 0 4px;
  white-space: nowrap;
}

.dash-StatusItem-button:hover {
  background: var(--jp-layout-color2);
}

.dash-StatusItem-button:focus-visible {
  outline: 2px solid var(--jp-brand-color1);
  outline-offset: -2px;
}

.dash-StatusItem.dash-mod-unreachable .dash-StatusItem-button {
  color: var(--jp-warn-color0);
}

.dash-Panel {
  background: var(--jp-layout-color1);
  color: var(--jp-ui-font-color1);
  font-family: var(--jp-ui-font-family);
  font-size: var(--jp-ui-font-size1);
  min-width: 320px;
  overflow: auto;
  padding: 8px 12px;
}

.dash-Panel:focus-visible {
  outline: 2px solid var(--jp-brand-color1);
  outline-offset: -2px;
}

.dash-Panel-title {
  font-size: var(--jp-ui-font-size3);
  margin: 4px 0 8px;
}

.dash-Panel-heading {
  border-bottom: var(--jp-border-width) solid var(--jp-border-color2);
  font-size: var(--jp-ui-font-size2);
  margin: 12px 0 6px;
  padding-bottom: 2px;
}

.dash-Panel-connection,
.dash-Panel-empty {
  color: var(--jp-ui-font-color2);
  margin: 4px 0;
}

.dash-Panel-totals {
  display: grid;
  gap: 2px 12px;
  grid-template-columns: max-content 1fr;
  margin: 0;
}

.dash-Panel-totals dt {
  color: var(--jp-ui-font-color2);
}

.dash-Panel-totals dd {
  margin: 0;
}

.dash-Panel-table {
  border-collapse: collapse;
  width: 100%;
}

.dash-Panel-caption {
  color: var(--jp-ui-font-color2);
  text-align: left;
}

.dash-Panel-table th,
.dash-Panel-table td {
  border-bottom: var(--jp-border-width) solid var(--jp-border-color3);
  padding: 2px 4px 2px 0;
  text-align: left;
  vertical-align: top;
}

.dash-Panel-table thead th {
  color: var(--jp-ui-font-color2);
  font-weight: 600;
}

.dash-Panel-work {
  list-style: none;
  margin: 0;
  padding: 0;
}

.dash-Panel-workItem {
  display: grid;
  gap: 2px;
  margin-bottom: 6px;
}

.dash-Panel-progress {
  width: 100%;
}

.dash-Panel-workDetail {
  color: var(--jp-ui-font-color2);
}

.dash-Panel-table {
  font-size: var(--jp-ui-font-size1);
  overflow-wrap: break-word;
}

.dash-Panel-sub {
  color: var(--jp-ui-font-color2);
  display: block;
  font-weight: normal;
}
`,""]),a.d(e,{},{A:i})},314(t){t.exports=function(t){var e=[];return e.toString=function(){return this.map(function(e){var a="",o=void 0!==e[5];return e[4]&&(a+="@supports (".concat(e[4],") {")),e[2]&&(a+="@media ".concat(e[2]," {")),o&&(a+="@layer".concat(e[5].length>0?" ".concat(e[5]):""," {")),a+=t(e),o&&(a+="}"),e[2]&&(a+="}"),e[4]&&(a+="}"),a}).join("")},e.i=function(t,a,o,r,n){"string"==typeof t&&(t=[[null,t,void 0]]);var i={};if(o)for(var s=0;s<this.length;s++){var l=this[s][0];null!=l&&(i[l]=!0)}for(var c=0;c<t.length;c++){var p=[].concat(t[c]);o&&i[p[0]]||(void 0!==n&&(void 0===p[5]||(p[1]="@layer".concat(p[5].length>0?" ".concat(p[5]):""," {").concat(p[1],"}")),p[5]=n),a&&(p[2]&&(p[1]="@media ".concat(p[2]," {").concat(p[1],"}")),p[2]=a),r&&(p[4]?(p[1]="@supports (".concat(p[4],") {").concat(p[1],"}"),p[4]=r):p[4]="".concat(r)),e.push(p))}},e}},601(t){t.exports=function(t){return t[1]}},72(t){var e=[];function a(t){for(var a=-1,o=0;o<e.length;o++)if(e[o].identifier===t){a=o;break}return a}function o(t,o){for(var r={},n=[],i=0;i<t.length;i++){var s=t[i],l=o.base?s[0]+o.base:s[0],c=r[l]||0,p="".concat(l," ").concat(c);r[l]=c+1;var d=a(p),u={css:s[1],media:s[2],sourceMap:s[3],supports:s[4],layer:s[5]};if(-1!==d)e[d].references++,e[d].updater(u);else{var f=function(t,e){var a=e.domAPI(e);return a.update(t),function(e){e?(e.css!==t.css||e.media!==t.media||e.sourceMap!==t.sourceMap||e.supports!==t.supports||e.layer!==t.layer)&&a.update(t=e):a.remove()}}(u,o);o.byIndex=i,e.splice(i,0,{identifier:p,updater:f,references:1})}n.push(p)}return n}t.exports=function(t,r){var n=o(t=t||[],r=r||{});return function(t){t=t||[];for(var i=0;i<n.length;i++){var s=a(n[i]);e[s].references--}for(var l=o(t,r),c=0;c<n.length;c++){var p=a(n[c]);0===e[p].references&&(e[p].updater(),e.splice(p,1))}n=l}}},659(t){var e={};t.exports=function(t,a){var o=function(t){if(void 0===e[t]){var a=document.querySelector(t);if(window.HTMLIFrameElement&&a instanceof window.HTMLIFrameElement)try{a=a.contentDocument.head}catch(t){a=null}e[t]=a}return e[t]}(t);if(!o)throw Error("Couldn't find a style target. This probably means that the value for the 'insert' parameter is invalid.");o.appendChild(a)}},540(t){t.exports=function(t){var e=document.createElement("style");return t.setAttributes(e,t.attributes),t.insert(e,t.options),e}},56(t,e,a){t.exports=function(t){var e=a.nc;e&&t.setAttribute("nonce",e)}},825(t){t.exports=function(t){if("u"<typeof document)return{update:function(){},remove:function(){}};var e=t.insertStyleElement(t);return{update:function(a){var o,r,n;o="",a.supports&&(o+="@supports (".concat(a.supports,") {")),a.media&&(o+="@media ".concat(a.media," {")),(r=void 0!==a.layer)&&(o+="@layer".concat(a.layer.length>0?" ".concat(a.layer):""," {")),o+=a.css,r&&(o+="}"),a.media&&(o+="}"),a.supports&&(o+="}"),(n=a.sourceMap)&&"u">typeof btoa&&(o+="\n/*# sourceMappingURL=data:application/json;base64,".concat(btoa(unescape(encodeURIComponent(JSON.stringify(n))))," */")),t.styleTagTransform(o,e,t.options)},remove:function(){var t;null===(t=e).parentNode||t.parentNode.removeChild(t)}}}},113(t){t.exports=function(t,e){if(e.styleSheet)e.styleSheet.cssText=t;else{for(;e.firstChild;)e.removeChild(e.firstChild);e.appendChild(document.createTextNode(t))}}},959(t,e,a){var o=a(72),r=a.n(o),n=a(825),i=a.n(n),s=a(659),l=a.n(s),c=a(56),p=a.n(c),d=a(540),u=a.n(d),f=a(113),h=a.n(f),v=a(646),m={};m.styleTagTransform=h(),m.setAttributes=p(),m.insert=l().bind(null,"head"),m.domAPI=i(),m.insertStyleElement=u(),r()(v.A,m),v.A&&v.A.locals&&v.A.locals}}]);