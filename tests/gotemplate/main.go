// Command gotemplate renders an Ollama TEMPLATE the way Ollama's /api/chat does, for edgezh's template tests.
//
// It reads one JSON request on stdin:
//
//	{"template": "...", "system": "..." | null, "messages": [...], "tools": [...] | null}
//
// where "system" is the Modelfile's SYSTEM and messages/tools have Ollama's (OpenAI-like) JSON shape, and
// writes the rendered prompt to stdout. Standard library only; this is an independent re-implementation of the
// data model documented by Ollama's source, not a copy of it. Each part names the Ollama file it mirrors.
// Only the chat path is reproduced (templates that use .Messages); Ollama's context-window truncation, images,
// thinking and built-in renderers are out of scope.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
	"time"
)

// ---- api/types.go: the request types and their JSON shapes (field order = marshal order) -------------------

// Message mirrors api.Message.
type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking,omitempty"`
	Images     [][]byte   `json:"images,omitempty"`
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolName   string     `json:"tool_name,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

// UnmarshalJSON lower-cases the role, as api.Message.UnmarshalJSON does.
func (m *Message) UnmarshalJSON(b []byte) error {
	type plain Message
	var p plain
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	*m = Message(p)
	m.Role = strings.ToLower(m.Role)
	return nil
}

// ToolCall mirrors api.ToolCall.
type ToolCall struct {
	ID       string           `json:"id,omitempty"`
	Function ToolCallFunction `json:"function"`
}

// ToolCallFunction mirrors api.ToolCallFunction; Arguments is an insertion-ordered object
// (api.ToolCallFunctionArguments), so a JSON string or array there is an error, as in Ollama.
type ToolCallFunction struct {
	Index     int              `json:"index"`
	Name      string           `json:"name"`
	Arguments *orderedMap[any] `json:"arguments"`
}

// Tool mirrors api.Tool.
type Tool struct {
	Type     string       `json:"type"`
	Items    any          `json:"items,omitempty"`
	Function ToolFunction `json:"function"`
}

// ToolFunction mirrors api.ToolFunction.
type ToolFunction struct {
	Name        string                 `json:"name"`
	Description string                 `json:"description,omitempty"`
	Parameters  ToolFunctionParameters `json:"parameters"`
}

// ToolFunctionParameters mirrors api.ToolFunctionParameters (Properties: api.ToolPropertiesMap, ordered).
type ToolFunctionParameters struct {
	Type       string                    `json:"type"`
	Defs       any                       `json:"$defs,omitempty"`
	Items      any                       `json:"items,omitempty"`
	Required   []string                  `json:"required,omitempty"`
	Properties *orderedMap[ToolProperty] `json:"properties"`
}

// ToolProperty mirrors api.ToolProperty: JSON Schema keys not listed here are dropped on input.
type ToolProperty struct {
	AnyOf       []ToolProperty            `json:"anyOf,omitempty"`
	Type        PropertyType              `json:"type,omitempty"`
	Items       any                       `json:"items,omitempty"`
	Description string                    `json:"description,omitempty"`
	Enum        []any                     `json:"enum,omitempty"`
	Properties  *orderedMap[ToolProperty] `json:"properties,omitempty"`
	Required    []string                  `json:"required,omitempty"`
}

// PropertyType mirrors api.PropertyType: a string or a list of strings; one type marshals as a string.
type PropertyType []string

func (pt *PropertyType) UnmarshalJSON(data []byte) error {
	var one string
	if err := json.Unmarshal(data, &one); err == nil {
		*pt = PropertyType{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(data, &many); err != nil {
		return err
	}
	*pt = many
	return nil
}

func (pt PropertyType) MarshalJSON() ([]byte, error) {
	if len(pt) == 1 {
		return json.Marshal(pt[0])
	}
	return json.Marshal([]string(pt))
}

// typeScript mirrors api.ToolProperty.ToTypeScriptType (used by the toTypeScriptType template function).
func (tp ToolProperty) typeScript() string {
	var types []string
	if len(tp.AnyOf) > 0 {
		for _, alt := range tp.AnyOf {
			types = append(types, alt.typeScript())
		}
		return strings.Join(types, " | ")
	}
	if len(tp.Type) == 0 {
		return "any"
	}
	names := map[string]string{"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
		"array": "any[]", "object": "Record<string, any>", "null": "null"}
	for _, t := range tp.Type {
		if name, ok := names[t]; ok {
			types = append(types, name)
		} else {
			types = append(types, "any")
		}
	}
	return strings.Join(types, " | ")
}

// orderedMap is a JSON object that keeps its keys' input order, like internal/orderedmap (which wraps
// github.com/wk8/go-ordered-map): values of type any decode as encoding/json does (nested objects become
// map[string]any, numbers float64), and a repeated key keeps its first position.
type orderedMap[V any] struct {
	keys   []string
	values map[string]V
}

func (m *orderedMap[V]) UnmarshalJSON(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return fmt.Errorf("expected a JSON object, got %s", data)
	}
	m.keys, m.values = nil, map[string]V{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key := tok.(string)
		var value V
		if err := dec.Decode(&value); err != nil {
			return err
		}
		if _, seen := m.values[key]; !seen {
			m.keys = append(m.keys, key)
		}
		m.values[key] = value
	}
	_, err := dec.Token() // the closing '}'
	return err
}

// MarshalJSON writes the keys in insertion order (encoding/json then compacts it and escapes <, >, &).
func (m orderedMap[V]) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, key := range m.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(key)
		v, err := json.Marshal(m.values[key])
		if err != nil {
			return nil, err
		}
		b.Write(k)
		b.WriteByte(':')
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// toMap mirrors orderedmap's ToMap: a plain Go map (nil for a nil map), whose JSON has sorted keys.
func (m *orderedMap[V]) toMap() map[string]V {
	if m == nil {
		return nil
	}
	out := make(map[string]V, len(m.keys))
	for _, key := range m.keys {
		out[key] = m.values[key]
	}
	return out
}

// ---- template/template.go: the values a template sees -----------------------------------------------------

// templateMessage mirrors template.templateMessage (what {{ range .Messages }} yields).
type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     [][]byte
	ToolCalls  []templateToolCall
	ToolName   string
	ToolCallID string
}

// templateToolCall / templateToolCallFunction mirror template.go's: Arguments is a plain map, so
// {{ json .Function.Arguments }} prints the keys sorted, and "null" for a call without arguments.
type templateToolCall struct {
	ID       string
	Function templateToolCallFunction
}

type templateToolCallFunction struct {
	Index     int
	Name      string
	Arguments templateArgs
}

type templateArgs map[string]any

// String mirrors templateArgs.String ({{ .Function.Arguments }} without json).
func (t templateArgs) String() string {
	if t == nil {
		return "{}"
	}
	b, _ := json.Marshal(t)
	return string(b)
}

// templateTool mirrors template.templateTool: description is NOT omitempty here, and the top-level
// properties are a plain map (sorted keys in JSON) while nested ToolProperty.Properties keep their order.
type templateTool struct {
	Type     string               `json:"type"`
	Items    any                  `json:"items,omitempty"`
	Function templateToolFunction `json:"function"`
}

type templateToolFunction struct {
	Name        string                         `json:"name"`
	Description string                         `json:"description"`
	Parameters  templateToolFunctionParameters `json:"parameters"`
}

type templateToolFunctionParameters struct {
	Type       string                  `json:"type"`
	Defs       any                     `json:"$defs,omitempty"`
	Items      any                     `json:"items,omitempty"`
	Required   []string                `json:"required,omitempty"`
	Properties map[string]ToolProperty `json:"properties"`
}

type templateTools []templateTool

// String mirrors templateTools.String ({{ .Tools }} prints the JSON list).
func (t templateTools) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

func (t templateTool) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

// convertTools mirrors convertToolsForTemplate: nil stays nil (so {{ if .Tools }} is false without tools).
func convertTools(tools []Tool) templateTools {
	if tools == nil {
		return nil
	}
	out := make(templateTools, len(tools))
	for i, tool := range tools {
		p := tool.Function.Parameters
		out[i] = templateTool{
			Type:  tool.Type,
			Items: tool.Items,
			Function: templateToolFunction{
				Name:        tool.Function.Name,
				Description: tool.Function.Description,
				Parameters: templateToolFunctionParameters{
					Type: p.Type, Defs: p.Defs, Items: p.Items, Required: p.Required,
					Properties: p.Properties.toMap(),
				},
			},
		}
	}
	return out
}

// convertMessages mirrors convertMessagesForTemplate.
func convertMessages(messages []*Message) []*templateMessage {
	out := make([]*templateMessage, len(messages))
	for i, msg := range messages {
		var calls []templateToolCall
		for _, tc := range msg.ToolCalls {
			calls = append(calls, templateToolCall{ID: tc.ID, Function: templateToolCallFunction{
				Index: tc.Function.Index, Name: tc.Function.Name, Arguments: tc.Function.Arguments.toMap(),
			}})
		}
		out[i] = &templateMessage{Role: msg.Role, Content: msg.Content, Thinking: msg.Thinking, Images: msg.Images,
			ToolCalls: calls, ToolName: msg.ToolName, ToolCallID: msg.ToolCallID}
	}
	return out
}

// collate mirrors template.go's collate: consecutive messages of the same role, except "tool", become one
// message whose content is joined with "\n\n" (only the content: later tool calls are lost); every system
// message's content is also joined into .System.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[n-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

// funcs mirrors template.go's FuncMap.
var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v) // encoding/json: compact, HTML-escaped, map keys sorted
		return string(b)
	},
	"currentDate": func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v any) string {
		switch p := v.(type) {
		case ToolProperty:
			return p.typeScript()
		case *ToolProperty:
			if p != nil {
				return p.typeScript()
			}
		}
		return "any"
	},
}

type request struct {
	Template string    `json:"template"`
	System   *string   `json:"system"`
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

func render(w io.Writer, req request) error {
	if len(req.Messages) == 0 {
		return errors.New("no messages: Ollama answers an empty chat without rendering (done_reason \"load\")")
	}
	// server/routes.go ChatHandler: the Modelfile SYSTEM is prepended only when the request does not start
	// with its own system message.
	msgs := req.Messages
	if req.System != nil && *req.System != "" && msgs[0].Role != "system" {
		msgs = append([]Message{{Role: "system", Content: *req.System}}, msgs...)
	}
	// template/template.go Parse: missingkey=zero and the FuncMap.
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		return err
	}
	// Template.Execute picks the chat path when the template mentions .Messages (Vars() is case-insensitive);
	// the legacy .System/.Prompt/.Response path is not reproduced here.
	if !strings.Contains(strings.ToLower(req.Template), ".messages") {
		return errors.New("template does not use .Messages; the legacy Prompt/Response path is not reproduced")
	}
	system, collated := collate(msgs)
	return tmpl.Execute(w, map[string]any{
		"System":     system,
		"Messages":   convertMessages(collated),
		"Tools":      convertTools(req.Tools),
		"Response":   "",
		"Think":      false,
		"ThinkLevel": "",
		"IsThinkSet": false,
	})
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "gotemplate: bad request:", err)
		os.Exit(2)
	}
	var out bytes.Buffer
	if err := render(&out, req); err != nil {
		fmt.Fprintln(os.Stderr, "gotemplate:", err)
		os.Exit(1)
	}
	os.Stdout.Write(out.Bytes())
}
