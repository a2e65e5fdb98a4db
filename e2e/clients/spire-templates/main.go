// spire-templates renders spire-controller-manager ClusterSPIFFEIDs for pods the way
// spire-controller-manager does (pkg/spireentry: text/template over its templateData,
// label selectors from metav1.LabelSelectorAsSelector, the SPIFFE ID parsed by go-spiffe
// and checked against the trust domain), so `sigil migrate`'s translations can be
// compared with the original on the same pods (cli/tests/migrate.rs).
//
// stdin:  {"trustDomain", "clusterName", "clusterDomain",
//          "objects": [{"name", "spec": <ClusterSPIFFEID spec>}],
//          "pods": [{"pod": <Pod>, "namespace": <Namespace>, "node": <Node>}]}
// stdout: {"results": [{"object", "pod", "selected", "spiffeID", "dnsNames", "error"}]}
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"text/template"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// templateData is spire-controller-manager's (pkg/spireentry/entries.go), field for field.
type templateData struct {
	TrustDomain   string
	ClusterName   string
	ClusterDomain string
	PodMeta       *metav1.ObjectMeta
	PodSpec       *corev1.PodSpec
	NodeMeta      *metav1.ObjectMeta
	NodeSpec      *corev1.NodeSpec
}

// spec holds the ClusterSPIFFEID fields that decide selection and rendering.
type spec struct {
	SPIFFEIDTemplate  string                `json:"spiffeIDTemplate"`
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector"`
	PodSelector       *metav1.LabelSelector `json:"podSelector"`
	DNSNameTemplates  []string              `json:"dnsNameTemplates"`
}

type input struct {
	TrustDomain   string `json:"trustDomain"`
	ClusterName   string `json:"clusterName"`
	ClusterDomain string `json:"clusterDomain"`
	Objects       []struct {
		Name string `json:"name"`
		Spec spec   `json:"spec"`
	} `json:"objects"`
	Pods []struct {
		Pod       corev1.Pod       `json:"pod"`
		Namespace corev1.Namespace `json:"namespace"`
		Node      corev1.Node      `json:"node"`
	} `json:"pods"`
}

type result struct {
	Object   string   `json:"object"`
	Pod      string   `json:"pod"`
	Selected bool     `json:"selected"`
	SPIFFEID string   `json:"spiffeID,omitempty"`
	DNSNames []string `json:"dnsNames,omitempty"`
	Error    string   `json:"error,omitempty"`
}

func selector(s *metav1.LabelSelector) (labels.Selector, error) {
	if s == nil {
		return labels.Everything(), nil
	}
	return metav1.LabelSelectorAsSelector(s)
}

func render(t *template.Template, data *templateData) (string, error) {
	buf := new(bytes.Buffer)
	if err := t.Execute(buf, data); err != nil {
		return "", fmt.Errorf("failed to execute template: %w", err)
	}
	return buf.String(), nil
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "spire-templates: bad input:", err)
		os.Exit(2)
	}
	td, err := spiffeid.TrustDomainFromString(in.TrustDomain)
	if err != nil {
		fmt.Fprintln(os.Stderr, "spire-templates: trust domain:", err)
		os.Exit(2)
	}
	var out struct {
		Results []result `json:"results"`
	}
	out.Results = []result{}
	for _, o := range in.Objects {
		for _, p := range in.Pods {
			r := result{Object: o.Name, Pod: p.Pod.Namespace + "/" + p.Pod.Name}
			r.Selected, r.SPIFFEID, r.DNSNames, err = one(o.Spec, &p.Pod, &p.Namespace, &p.Node, td, in.ClusterName, in.ClusterDomain)
			if err != nil {
				r.Error = err.Error()
			}
			out.Results = append(out.Results, r)
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}

func one(s spec, pod *corev1.Pod, ns *corev1.Namespace, node *corev1.Node, td spiffeid.TrustDomain, clusterName, clusterDomain string) (bool, string, []string, error) {
	// As ParseClusterSPIFFEIDSpec: templates parsed by text/template with no functions
	// added and the default missingkey behaviour.
	idTemplate, err := template.New("spiffeIDTemplate").Parse(s.SPIFFEIDTemplate)
	if err != nil {
		return false, "", nil, fmt.Errorf("invalid SPIFFEID template: %w", err)
	}
	nsSel, err := selector(s.NamespaceSelector)
	if err != nil {
		return false, "", nil, err
	}
	podSel, err := selector(s.PodSelector)
	if err != nil {
		return false, "", nil, err
	}
	if !nsSel.Matches(labels.Set(ns.Labels)) || !podSel.Matches(labels.Set(pod.Labels)) {
		return false, "", nil, nil
	}
	data := &templateData{
		TrustDomain:   td.Name(),
		ClusterName:   clusterName,
		ClusterDomain: clusterDomain,
		PodMeta:       &pod.ObjectMeta,
		PodSpec:       &pod.Spec,
		NodeMeta:      &node.ObjectMeta,
		NodeSpec:      &node.Spec,
	}
	rendered, err := render(idTemplate, data)
	if err != nil {
		return true, "", nil, err
	}
	id, err := spiffeid.FromString(rendered)
	if err != nil {
		return true, "", nil, fmt.Errorf("invalid SPIFFE ID %q: %w", rendered, err)
	}
	if id.TrustDomain() != td {
		return true, "", nil, fmt.Errorf("invalid SPIFFE ID: expected trust domain %q but got %q", td, id.TrustDomain())
	}
	var dnsNames []string
	seen := map[string]bool{}
	for i, d := range s.DNSNameTemplates {
		t, err := template.New(fmt.Sprintf("dnsNameTemplate-%d", i)).Parse(d)
		if err != nil {
			return true, "", nil, fmt.Errorf("invalid DNS name template: %w", err)
		}
		name, err := render(t, data)
		if err != nil {
			return true, "", nil, fmt.Errorf("failed to render DNS name: %w", err)
		}
		if !seen[name] {
			seen[name] = true
			dnsNames = append(dnsNames, name)
		}
	}
	return true, id.String(), dnsNames, nil
}
