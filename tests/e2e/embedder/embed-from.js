// Adds <script type="module" src="LIB/latent-gen.js">, as a site embedding the element from a CDN writes it.
const lib = new URLSearchParams(location.search).get('lib');
const script = document.createElement('script');
script.type = 'module';
script.src = new URL('latent-gen.js', lib).href;
document.head.append(script);
